"""Whole-tensor reductions whose result does not depend on the CPU thread count.

``tensor.sum()``, ``torch.dot`` and ``torch.linalg.vector_norm`` over a whole tensor split the work
across threads once it is larger than ATen's grain (32768 elements) and add the per-thread partial
sums in an order set by the thread count, so the same recipe gave different bytes with
``OMP_NUM_THREADS=1`` and ``=2``. Here a tensor is cut into fixed blocks of ``BLOCK`` elements,
each block is summed in float64 by one thread (a row reduction: one output, one thread), and the
block sums are added with ``math.fsum`` (exact, so their order does not matter). Squares and
products of float32 (or narrower) values are exact in float64, so the only rounding left is
inside a block, in an order fixed by ``BLOCK``. This module is the one place such sums are taken.

The tensor-valued helpers (:func:`l1`, :func:`norm`, :func:`dot`) keep torch's own reduction, in the
tensor's precision, below ``GRAIN``: there ATen reduces on one thread whatever the thread count, so
the result is already fixed and equals mergekit's bit for bit (the parity tests). Above it, where
mergekit's own result changes with the thread count, they use the fixed float64 order.
"""

from __future__ import annotations

import math

import torch

GRAIN = 32768          # ATen's internal::GRAIN_SIZE: smaller reductions run on one thread
BLOCK = 4096           # elements per partial sum: far below ATen's parallel grain
CHUNK = 1 << 20        # elements converted to float64 at a time (bounds the extra memory)


def _fsum_blocks(pieces) -> float:
    partials: list[float] = []
    for part in pieces:
        n = part.numel() // BLOCK * BLOCK
        if n:
            partials.extend(part[:n].view(-1, BLOCK).sum(dim=1).tolist())
        if n < part.numel():
            partials.append(float(part[n:].sum()))
    return math.fsum(partials)


def det_sum(t: torch.Tensor) -> float:
    """The sum of every entry of ``t``, in float64, the same on any thread count."""
    flat = t.reshape(-1)
    return _fsum_blocks(p.to(torch.float64) for p in flat.split(CHUNK))


def det_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` over every entry, in float64, the same on any thread count."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return _fsum_blocks(x.to(torch.float64) * y.to(torch.float64) for x, y in zip(fa.split(CHUNK), fb.split(CHUNK)))


def det_sqnorm(t: torch.Tensor) -> float:
    """``||t||^2`` in float64, the same on any thread count."""
    return _fsum_blocks(p.to(torch.float64).square() for p in t.reshape(-1).split(CHUNK))


def det_norm(t: torch.Tensor) -> float:
    """``||t||`` in float64, the same on any thread count."""
    return math.sqrt(det_sqnorm(t))


def det_abs_sum(t: torch.Tensor) -> float:
    """``sum |t|`` (the L1 norm) in float64, the same on any thread count."""
    return _fsum_blocks(p.to(torch.float64).abs() for p in t.reshape(-1).split(CHUNK))


def _scalar(value: float, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype or like.dtype, device=like.device)


def l1(t: torch.Tensor) -> torch.Tensor:
    """``sum |t|`` as a 0-d tensor of ``t``'s dtype, the same on any thread count."""
    return t.abs().sum() if t.numel() < GRAIN else _scalar(det_abs_sum(t), t, None)


def norm(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``||t||`` over every entry as a 0-d tensor (of ``dtype``, default ``t``'s), the same on any
    thread count."""
    if t.numel() < GRAIN:
        return torch.linalg.vector_norm(t if dtype is None else t.to(dtype))
    return _scalar(det_norm(t), t, dtype)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>`` over every entry as a 0-d tensor of ``a``'s dtype, the same on any thread count."""
    if a.numel() < GRAIN:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return _scalar(det_dot(a, b), a, None)
