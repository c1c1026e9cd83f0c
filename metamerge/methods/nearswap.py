"""``nearswap``: mergekit 0.1.5's NearSwap. Where the fine-tune is close to the base it takes the
fine-tune, elsewhere it stays near the base: per element ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``,
``out = w * b + (1 - w) * a`` with ``a`` the base and ``b`` the one fine-tune. Elements that differ
by at most ``t`` are swapped in entirely.
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NearSwap of base ``a`` and model ``b`` (mergekit's kernel, op for op), and the weights."""
    absdiff = torch.abs(a - b)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a, weight


def one_fine_tune(method: str, recipe, source: str) -> None:
    """mergekit's contract for base + exactly one model (nearswap, arcee_fusion)."""
    n = len(recipe.fine_tunes())
    if n != 1:
        raise MergeError(f"{source}: {method} merges base_model with exactly one other model (got {n}); "
                         "list one fine-tune under models")


@register
class NearSwap(MergeMethod):
    name = "nearswap"
    summary = "take the fine-tune's value where it is within t of the base, interpolate toward the base elsewhere"
    base_policy = "required"
    task_vectors = False
    params = (Param("t", hint="the distance below which the fine-tune's value is taken whole"),)

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        one_fine_tune(cls.name, recipe, source)

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.base is not None
        out, weight = nearswap(job.base, job.tensors[0], job.globals["t"])
        return MergeOutput(out, [float(weight.mean())])  # the fine-tune's mean weight
