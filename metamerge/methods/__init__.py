"""Merge methods, registered by name. Importing this package registers them all."""

from . import karcher, linear, metagpt, multislerp, nuslerp, slerp, task_arithmetic  # noqa: F401 (registers)
from .base import MergeMethod, MergeOutput, Param, TensorJob, available_methods, get_method

__all__ = ["MergeMethod", "MergeOutput", "Param", "TensorJob", "available_methods", "get_method"]
