"""Sparsification of task vectors (TIES trimming, DARE dropping) and TIES sign election.

Pure functions over tensors. The operation order follows mergekit 0.1.5's so that recipes give
the same tensors in both tools: top-k keeps ``max(1, int(density * n))`` entries, and the
optional rescale keeps the L1 norm of the task vector (mergekit's ``rescale``), which is not the
paper's ``1/density``. DARE masks are always drawn on the CPU so that a seed gives the same mask
on any device; who owns the generator (one stream for the whole merge, as in mergekit, or one per
(model, tensor), for MetaGPT's cacheable norms) is the caller's choice.
"""

from __future__ import annotations

import hashlib

import torch

from .reduce import l1


def rescale_l1(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale the kept entries so the L1 norm of the task vector is unchanged (mergekit's rescale).

    The two L1 norms are taken in an order fixed whatever the thread count (:mod:`metamerge.reduce`),
    so the factor, and with it every byte, is the same on any machine."""
    before, after = l1(tau), l1(kept)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def magnitude(tau: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES's trim)."""
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    k = max(1, int(density * tau.numel()))
    w = tau.abs().reshape(-1).float()
    top = torch.argsort(w, descending=True)[:k]
    mask = torch.zeros(tau.numel(), dtype=tau.dtype, device=tau.device)
    mask[top] = 1
    kept = tau * mask.reshape(tau.shape)
    return rescale_l1(tau, kept) if rescale else kept


def seed_for(seed: int, model_key: str, tensor_name: str) -> int:
    """A 63-bit seed that depends only on the recipe seed, the model and the tensor."""
    digest = hashlib.sha256(f"{seed}\0{model_key}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(tau: torch.Tensor, density: float, generator: torch.Generator, *,
         rescale: str | None = "inverse") -> torch.Tensor:
    """Drop each entry with probability ``1 - density``, then rescale the survivors.

    ``rescale``: ``"inverse"`` multiplies by ``1/density`` (the DARE paper, used with MetaGPT),
    ``"l1"`` keeps the L1 norm (mergekit's dare_linear / dare_ties), None keeps them as they are.
    No random number is drawn when ``density >= 1``, as in mergekit.
    """
    if density >= 1:
        return tau
    keep = torch.bernoulli(torch.full(tau.shape, density, dtype=torch.float32), generator=generator)
    kept = tau * keep.to(device=tau.device, dtype=tau.dtype)
    if rescale == "l1":
        return rescale_l1(tau, kept)
    if rescale == "inverse":
        kept /= density
    return kept


def sign_consensus(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES's sign election over stacked weighted deltas: 1 where an entry agrees, else 0.

    ``sum`` elects the sign of the summed mass, ``count`` the sign most entries have; zero mass
    elects +, as in mergekit.
    """
    sign = weighted.sign()
    mass = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    majority = (mass >= 0).to(weighted.dtype) * 2 - 1
    return (sign == majority).to(weighted.dtype)


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float, *, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude entries (outliers) and
    the smallest, keeping ``int(density * n)`` entries (mergekit's order: an ascending sort, the
    kept window starts after the ``n - kept - outliers`` smallest)."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    order = torch.sort(tau.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
    mask[order[n_bottom:n_bottom + target]] = 1
    kept = tau * mask.view_as(tau)
    return rescale_l1(tau, kept) if rescale else kept


def della_magprune(tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *,
                   rescale: bool = False) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with a probability that grows with its magnitude rank in
    its row, from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest); mergekit's
    draw, on the CPU generator so a seed gives the same mask on any device."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    keep = torch.bernoulli(probs.cpu(), generator=generator).to(device=tau.device, dtype=tau.dtype)
    kept = (rows * keep).reshape(tau.shape)
    return rescale_l1(tau, kept) if rescale else kept
