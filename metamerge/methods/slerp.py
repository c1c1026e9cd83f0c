"""``slerp``: spherical linear interpolation between the base and one other model (mergekit's ``slerp``).

Each tensor is flattened and treated as one vector. With ``theta`` the angle between the base
``v0`` and the other model ``v1``:

    slerp(t) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

so ``t = 0`` gives the base and ``t = 1`` the other model. When the two are (anti)parallel,
``|cos theta| > 0.9995``, it falls back to ``(1 - t) v0 + t v1``. ``t`` is global and may be a
gradient over the layers or a list of ``{filter, value}``.

As in mergekit 0.1.5, ``base_model`` is the first endpoint (listed under ``models`` or not), the
coefficients are computed in the compute dtype (float32 unless the recipe says float64), norms
are taken per chunk of 2**20 entries and combined as a norm of norms, and the cosine is the sum of
the chunks' dot products of the unit vectors.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .base import MergeMethod, MergeOutput, Param, TensorJob, register

CHUNK = 1 << 20          # entries per chunk of full-precision scratch (mergekit's _CHUNK_ELEMENTS)
DOT_THRESHOLD = 0.9995   # |cos theta| above this: linear interpolation
EPS = 1e-8               # norms at or below this count as 1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = EPS) -> torch.Tensor:
    """Spherical interpolation of two same-shaped tensors, each taken as one flat vector."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    spans = [(s, s + CHUNK) for s in range(0, a.shape[1], CHUNK)]

    def chunk(x: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        return x[:, span[0]:span[1]].to(dtype)

    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True)
                                                   for s in spans]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True)
                                                   for s in spans]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((chunk(a, s) / norm_a) * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True)
                       for s in spans]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in spans:
        out[:, s[0]:s[1]] = coef_a * chunk(a, s) + coef_b * chunk(b, s)
    return out.reshape(v0.shape)


@register
class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation from base_model (t=0) to one other model (t=1); lerp when parallel"
    base_policy = "required"  # base_model is the first endpoint
    task_vectors = False
    params = (Param("t"),)

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        others = cls.input_entries(recipe)
        if len(others) != 1:
            raise MergeError(f"{source}: slerp interpolates base_model and exactly one other model, got "
                             f"{len(others)} besides the base; list one model (and optionally the base) under models")

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.base is not None and len(job.tensors) == 1
        t = job.globals["t"]
        return MergeOutput(slerp(t, job.base, job.tensors[0]), [t])
