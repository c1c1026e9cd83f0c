"""Element and byte counts of a tensor from its shape and dtype, without allocating it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of ``shape`` (1 for a scalar's empty shape)."""
    return math.prod(shape)


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` stored contiguously."""
    return numel(shape) * dtype.itemsize
