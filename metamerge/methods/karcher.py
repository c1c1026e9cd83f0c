"""``karcher``: the Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by
their mean norm (mergekit's ``karcher``).

Every input, ``base_model`` included (it is just one more input, appended when not listed), gets
weight 1/n. Each tensor is one flat vector ``x_i = r_i u_i`` with ``|u_i| = 1``. Starting from the
normalised mean of the unit vectors, the mean direction ``m`` is refined by Riemannian gradient
steps (at most ``max_iter``, default 10):

    v = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),   m <- cos|v| m + sin|v| v/|v|

until ``|v| < tol`` (default 1e-5); the result is ``(sum_i a_i r_i) m``. Inputs with norm at most
``tol`` are left out of the direction (their weights renormalised over the rest) but still count
in the norm; all of them that small gives zero.
"""

from __future__ import annotations

import torch

from ..reduce import dot, norm
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` on the unit sphere, times the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    # whole-tensor norms and dots in an order fixed whatever the thread count (metamerge.reduce)
    norms = [norm(x, dtype) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    keep = [i for i, n in enumerate(norms) if n.item() > tol]
    if not keep:
        return torch.zeros_like(tensors[0])
    kept = sum(alphas[i] for i in keep)
    a = [alphas[i] / kept for i in keep]
    u = [units[i] for i in keep]

    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = norm(mean, dtype)
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            cos = torch.clamp(dot(mean, ui), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += ai * (theta / torch.sin(theta)) * (ui - cos * mean)
        step_norm = norm(step, dtype)
        if step_norm.item() < tol:
            break
        mean = (torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)).to(mean.dtype)
        unit_norm = norm(mean, dtype)
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return scale * mean


@register
class Karcher(MergeMethod):
    name = "karcher"
    summary = "Karcher mean of the models' directions on the sphere, scaled by their mean norm (equal weights)"
    base_policy = "input"  # a base_model is one more input, with the same weight
    task_vectors = False
    params = (
        Param("max_iter", default=10, kind=int, check=lambda v: v >= 0, hint="a non-negative number of iterations"),
        Param("tol", default=1e-5, check=lambda v: v >= 0, hint="a small non-negative number"),
    )

    def merge(self, job: TensorJob) -> MergeOutput:
        n = len(job.tensors)
        alphas = [1.0 / n] * n
        return MergeOutput(karcher_mean(job.tensors, alphas, job.globals["max_iter"], job.globals["tol"]), alphas)
