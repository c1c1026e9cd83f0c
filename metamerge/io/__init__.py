"""Streaming safetensors I/O: read a tensor at a time, write shards as the merge goes."""

from .reader import ModelReader, TensorInfo
from .writer import ShardedWriter, parse_size

__all__ = ["ModelReader", "TensorInfo", "ShardedWriter", "parse_size"]
