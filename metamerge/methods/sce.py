"""``sce``: select, calculate, erase (FuseLLM's SCE, arXiv 2408.07990), as mergekit 0.1.5 computes it.

Over the stacked task vectors ``tau_t = theta_t - theta_0`` of one tensor:

1. **select** (only when ``select_topk < 1``): keep the ``int(count_nonzero(var) * select_topk)``
   entries whose variance across the fine-tunes is largest, in every task vector alike;
2. **calculate**: each fine-tune's weight is the mean of its selected squared entries, normalised
   to sum to one (equal weights when they sum to almost nothing);
3. **erase**: TIES's sign election over the (unweighted) task vectors, then the weighted mean of the
   agreeing entries, the divisor clamped at 1e-6.

mergekit's ``sce`` has no per-model parameter (no ``weight``): the weights come from the task
vectors. ``int8_mask`` only changes the mask's storage there, not a value, so it is accepted and
changes nothing here. Every operation is mergekit's, in its order, so float32 tensors match.
"""

from __future__ import annotations

import torch

from .. import sparsify as sp
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def sce_select(deltas: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """The 0/1 selection mask over one tensor's entries (None: keep all), from the variance of the
    stacked task vectors across fine-tunes (population variance, as mergekit)."""
    if fraction >= 1:
        return None
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)  # a float32 product, as mergekit's
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each fine-tune's mean squared entry, normalised to sum to one (uniform when ~0)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


@register
class SCE(MergeMethod):
    name = "sce"
    summary = "select high-variance entries (select_topk), weight by mean squared delta, TIES sign erase"
    params = (
        Param("select_topk", default=1.0),
        Param("int8_mask", default=False, kind=bool),
    )

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.deltas is not None and job.base is not None
        deltas = torch.stack(job.deltas, dim=0)
        mask = sce_select(deltas, job.globals["select_topk"])
        if mask is not None:
            deltas = deltas * mask.unsqueeze(0)
        erase = sp.sign_consensus(deltas, "sum")
        weights = sce_weights(deltas)
        w = weights.view(-1, *([1] * (deltas.dim() - 1)))
        erased = w * erase
        mixed = (deltas * erased).sum(dim=0)
        mixed /= torch.sum(erased, dim=0).clamp(min=1e-6)
        return MergeOutput(mixed.add_(job.base), [float(x) for x in weights])
