"""``nuslerp``: spherical interpolation of two models with relative weights (mergekit's ``nuslerp``).

Two models ``v0``, ``v1`` (recipe order) with weights ``w0``, ``w1`` are interpolated at
``t = w1 / (w0 + w1)`` (0.5 when the weights sum to about 0):

    nuslerp(t) = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)

With a ``base_model`` the two task vectors are interpolated and added back to the base. By
default (``nuslerp_flatten: true``) each tensor is one vector; with ``nuslerp_flatten: false``
every row (last axis) is interpolated on its own, or every column with ``nuslerp_row_wise: true``
(mergekit's naming). Unlike ``slerp`` the result is not renormalised, and only exactly parallel
vectors (``1 - cos^2 theta <= 1e-16``) fall back to ``(1 - t) v0 + t v1``.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from ..reduce import GRAIN, dot, norm
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """Spherical interpolation along ``dim`` (or of the flattened tensors), not renormalised."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    # one large flat vector: its norm and dot in an order fixed whatever the thread count
    whole = v0.dim() == 1 and v0.numel() >= GRAIN

    def unit(x: torch.Tensor) -> torch.Tensor:
        if whole:
            return x / norm(x).clamp(min=1e-7).reshape(1)
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if whole:
        cos_theta = dot(unit(v0), unit(v1)).reshape(1).clamp(-1, 1)
    else:
        cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0, cos_theta))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(parallel, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    summary = "spherical interpolation of two models (or their task vectors) at t = w1 / (w0 + w1)"
    base_policy = "optional"  # with a base_model, the two task vectors are interpolated
    task_vectors = True
    params = (
        Param("weight", per_model=True),
        Param("nuslerp_flatten", default=True, kind=bool),
        Param("nuslerp_row_wise", default=False, kind=bool),
    )

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        entries = cls.input_entries(recipe)
        if len(entries) != 2:
            besides = " besides base_model" if cls.uses_base(recipe) else ""
            raise MergeError(f"{source}: nuslerp interpolates exactly two models{besides}, got {len(entries)}; "
                             "list two models under models (use multislerp for more)")

    def merge(self, job: TensorJob) -> MergeOutput:
        weights = [p["weight"] for p in job.params]
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        dim = 0 if job.globals["nuslerp_row_wise"] else -1
        flatten = job.globals["nuslerp_flatten"]
        if job.deltas is not None:
            assert job.base is not None
            return MergeOutput(job.base + nuslerp(t, job.deltas[0], job.deltas[1], dim=dim, flatten=flatten),
                               [1 - t, t])
        return MergeOutput(nuslerp(t, job.tensors[0], job.tensors[1], dim=dim, flatten=flatten), [1 - t, t])
