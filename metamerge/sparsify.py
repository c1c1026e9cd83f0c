"""Sparsification of task vectors (TIES trimming, DARE dropping) and TIES sign election.

Pure functions over tensors. The operation order follows mergekit's so that recipes give the same
tensors in both tools. DARE's mask is drawn on the CPU from a generator seeded by (seed, model,
tensor): the same recipe and seed give the same mask on any device, in any order, which also lets
a fine-tune's norms be cached on their own.
"""

from __future__ import annotations

import hashlib

import torch


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES's trim)."""
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    w = tau.abs().reshape(-1).float()
    top = torch.argsort(w, descending=True)[:k]
    mask = torch.zeros_like(tau)
    mask.view(-1)[top] = 1
    return tau * mask


def seed_for(seed: int, model_key: str, tensor_name: str) -> int:
    """A 63-bit seed that depends only on the recipe seed, the model and the tensor."""
    digest = hashlib.sha256(f"{seed}\0{model_key}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(tau: torch.Tensor, density: float, *, seed: int, rescale: bool = True) -> torch.Tensor:
    """Drop entries with probability ``1 - density``; rescale the rest by ``1/density``."""
    if density >= 1:
        return tau
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.bernoulli(torch.full(tau.shape, density, dtype=torch.float32), generator=gen)
    out = tau * keep.to(device=tau.device, dtype=tau.dtype)
    if rescale:
        out /= density
    return out


def sign_consensus(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES's sign election over stacked weighted deltas: 1 where an entry agrees, else 0.

    ``sum`` elects the sign of the summed mass, ``count`` the sign most entries have; zero mass
    elects +, as in mergekit.
    """
    sign = weighted.sign()
    mass = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    majority = (mass >= 0).to(weighted.dtype) * 2 - 1
    return (sign == majority).to(weighted.dtype)
