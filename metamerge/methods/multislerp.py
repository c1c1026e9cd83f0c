"""``multislerp``: weighted interpolation of any number of models on the hypersphere (mergekit's
``multislerp``, barycentric interpolation in the tangent space at the weighted mean direction).

Each model's tensor (its task vector when there is a ``base_model``) is flattened and projected to
the unit sphere; the weighted mean of the unit vectors gives the tangent point ``m``; the weighted
sum of the tangent projections ``u_i - (u_i . m) m`` is mapped back with the exponential map and
scaled by the weighted mean norm. ``normalize_weights`` (default true) divides the weights by their
sum; ``eps`` (1e-8) guards the divisions. With two models whose weighted mean direction vanishes
(antiparallel, equal weights) it falls back to the weighted sum; with more it is an error, unless
every input equals the base (a tensor no fine-tune changed, as with LoRA adapters): that is
returned as it is (mergekit raises there). One model is returned as it is.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from ..reduce import norm
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8, name: str = "tensor") -> torch.Tensor:
    """The multislerp of ``tensors`` (of ``tensors - base`` plus ``base`` when a base is given)."""
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    # whole-vector norms in float64, in a fixed order (row norms above are one thread per row)
    mean_norm = norm(mean)
    if mean_norm < eps:
        if not bool(norms.any()):
            # every input is the base (or zero): no direction to interpolate, and no doubt about the
            # answer. mergekit raises here; a tensor that no fine-tune changed (e.g. one that no LoRA
            # adapter targets) is common, so it is returned unchanged.
            return base.clone() if base is not None else x[0].clone()
        if x.shape[0] != 2:
            raise MergeError(f"multislerp: the weighted mean direction of tensor '{name}' is zero (antipodal "
                             "inputs with balancing weights); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out + base if base is not None else out


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "weighted spherical (tangent-space) interpolation of any number of models or task vectors"
    base_policy = "optional"  # with a base_model, the task vectors are interpolated
    task_vectors = False      # one model is returned as it is, not as base + (model - base)
    params = (
        Param("weight", per_model=True),
        Param("normalize_weights", default=True, kind=bool),
        Param("eps", default=1e-8, check=lambda v: v >= 0, hint="a small non-negative number"),
    )

    def merge(self, job: TensorJob) -> MergeOutput:
        weights = [p["weight"] for p in job.params]
        normalize = job.globals["normalize_weights"]
        if normalize and len(weights) > 1 and sum(weights) == 0:  # mergekit would write NaN
            raise MergeError(f"multislerp: the weights for tensor '{job.name}' sum to 0, so normalize_weights: "
                             "true would divide by zero; change the weights or set normalize_weights: false")
        out = multislerp(job.tensors, weights, job.base, normalize, job.globals["eps"], job.name)
        total = sum(weights)
        return MergeOutput(out, [w / total for w in weights] if normalize and total else weights)
