"""``linear``: a weighted average of whole models (mergekit's ``linear``; the "weight average" baseline).

As in mergekit, a ``base_model`` is one of the averaged inputs (appended if not listed, taking its
weight from the global ``parameters``), and the sum is accumulated in float32 with one
``addcmul_`` per model in input order, then divided by the summed weights.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of whole models (weights normalised by default)"
    base_policy = "input"  # base_model, if given, is one more model in the average
    task_vectors = False
    params = (
        Param("weight", per_model=True),
        Param("normalize", default=True, kind=bool),
    )

    def merge(self, job: TensorJob) -> MergeOutput:
        first = job.tensors[0]
        weights = torch.tensor([p["weight"] for p in job.params], dtype=first.dtype, device=first.device)
        out = torch.zeros_like(first)
        for tensor, coefficient in zip(job.tensors, weights.unbind(0)):
            out.addcmul_(tensor, coefficient)
        coeffs = [p["weight"] for p in job.params]
        if job.globals["normalize"]:
            if float(weights.sum()) == 0:  # mergekit would write NaN/Inf here
                raise MergeError(f"linear: the weights for tensor '{job.name}' sum to 0, so normalize: true "
                                 "would divide by zero; change the weights or set normalize: false")
            out.div_(weights.sum())
            total = sum(coeffs)
            coeffs = [c / total for c in coeffs] if total else coeffs
        return MergeOutput(out, coeffs)
