"""``linear``: a weighted average of whole models (mergekit's ``linear``; the "weight average" baseline)."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeOutput, Param, TensorJob, register


@register
class Linear(MergeMethod):
    name = "linear"
    needs_base = False  # the models listed are averaged; base_model is optional and unused
    params = (
        Param("weight", per_model=True),
        Param("normalize", default=True, kind=bool),
    )

    def merge(self, job: TensorJob) -> MergeOutput:
        stacked = torch.stack(job.tensors, dim=0)
        weights = torch.tensor([p["weight"] for p in job.params], dtype=stacked.dtype, device=stacked.device)
        w = weights.view(-1, *([1] * (stacked.dim() - 1)))
        out = (w * stacked).sum(dim=0)
        coeffs = [p["weight"] for p in job.params]
        if job.globals["normalize"]:
            out = out / w.sum(dim=0)
            total = sum(coeffs)
            coeffs = [c / total for c in coeffs] if total else coeffs
        return MergeOutput(out, coeffs)
