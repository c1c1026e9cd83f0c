"""Merge methods, registered by name. Importing this package registers them all."""

from . import (  # noqa: F401  (registration side effect: one module per method)
    arcee_fusion,
    karcher,
    linear,
    metagpt,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from .base import MergeMethod, MergeOutput, Param, TensorJob, available_methods, get_method

__all__ = ["MergeMethod", "MergeOutput", "Param", "TensorJob", "available_methods", "get_method"]
