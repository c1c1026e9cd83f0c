"""Whole-tensor reductions whose result does not depend on the CPU thread count.

``tensor.sum()``, ``torch.dot`` and ``torch.linalg.vector_norm`` over a whole tensor split the work
across threads once it is larger than ATen's grain (32768 elements) and add the per-thread partial
sums in an order set by the thread count, so the same recipe gave different bytes with
``OMP_NUM_THREADS=1`` and ``=2``. Here a tensor is cut into fixed blocks of ``BLOCK`` elements,
each block is summed by one thread with a float64 accumulator (a row reduction: one output, one
thread), and the block sums are added with ``math.fsum`` (exact, so their order does not matter).
Products and squares are formed in float32 (float64 for float64 input), one ``CHUNK`` at a time, so
no float64 copy of a tensor is ever made: an earlier version widened every chunk to float64 first and
was ~10x slower than the merge it served. This module is the one place such sums are taken.

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
CHUNK = 1 << 20        # elements taken at a time (bounds the extra memory to a few MB)


def _wide(part: torch.Tensor) -> torch.Tensor:
    """``part`` in float32 or wider: bf16/fp16 are widened one chunk at a time; float32 and
    float64 are used as they are (no copy)."""
    return part if part.dtype in (torch.float32, torch.float64) else part.float()


def _chunks(t: torch.Tensor):
    return t.reshape(-1).split(CHUNK)


def _block_sums(pieces) -> list[float]:
    """Sum each ``BLOCK`` of every piece on one thread (a row reduction in the piece's dtype).

    The block sums of a tensor are the same whether it is reduced whole or one ``CHUNK``-aligned
    piece at a time, so a tensor merged in chunks reports the very same sums (added with fsum)."""
    sums: list[torch.Tensor] = []
    for part in pieces:
        n = part.numel() // BLOCK * BLOCK
        if n:
            sums.append(part[:n].view(-1, BLOCK).sum(dim=1))
        if n < part.numel():
            sums.append(part[n:].sum().reshape(1))
    return torch.cat([s.double() for s in sums]).tolist() if sums else []


def _fsum_blocks(pieces) -> float:
    """The block sums added in float64 exactly, so their order does not matter."""
    return math.fsum(_block_sums(pieces))


def det_sum(t: torch.Tensor) -> float:
    """The sum of every entry of ``t``, accumulated in float64, the same on any thread count."""
    return _fsum_blocks(_wide(p) for p in _chunks(t))


def _scratch(*ts: torch.Tensor) -> torch.Tensor:
    """One reusable buffer for a call's products: a fresh multi-MB tensor per chunk costs an
    mmap, page faults and an munmap each time, which cost more than the arithmetic."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.empty(min(CHUNK, ts[0].numel()), dtype=dtype, device=ts[0].device)


def dot_blocks(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """The block sums of ``a * b`` (see :func:`_block_sums`); :func:`det_dot` is their fsum."""
    buf = _scratch(a, b)
    return _block_sums(torch.mul(_wide(x), _wide(y), out=buf[: x.numel()]) for x, y in zip(_chunks(a), _chunks(b)))


def sqnorm_blocks(t: torch.Tensor) -> list[float]:
    """The block sums of ``t * t``; :func:`det_sqnorm` is their fsum."""
    buf = _scratch(t)
    return _block_sums(torch.mul(w, w, out=buf[: w.numel()]) for w in map(_wide, _chunks(t)))


def det_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` over every entry, accumulated in float64, the same on any thread count."""
    return math.fsum(dot_blocks(a, b))


def det_sqnorm(t: torch.Tensor) -> float:
    """``||t||^2`` accumulated in float64, the same on any thread count."""
    return math.fsum(sqnorm_blocks(t))


def det_norm(t: torch.Tensor) -> float:
    """``||t||`` in float64, the same on any thread count."""
    return math.sqrt(det_sqnorm(t))


def det_abs_sum(t: torch.Tensor) -> float:
    """``sum |t|`` (the L1 norm) accumulated in float64, the same on any thread count."""
    buf = _scratch(t)
    return _fsum_blocks(torch.abs(_wide(p), out=buf[: p.numel()]) for p in _chunks(t))


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
