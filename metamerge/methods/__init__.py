"""Merge methods, registered by name. Importing this package registers them all."""

from . import linear, metagpt, ram, sce, task_arithmetic  # noqa: F401  (registration side effect)
from .base import MergeMethod, MergeOutput, Param, TensorJob, available_methods, get_method

__all__ = ["MergeMethod", "MergeOutput", "Param", "TensorJob", "available_methods", "get_method"]
