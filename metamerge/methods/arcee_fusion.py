"""``arcee_fusion``: mergekit 0.1.5's Arcee Fusion of base_model with one fine-tune.

Each element's importance is ``|b - a| * KL(softmax(b) || softmax(a))``, the KL taken along the
last axis (per row; over the whole tensor when it is 1-D), with 1e-8 added to both softmaxes. An
element takes the fine-tune's value where its importance reaches ``median + 1.5 * (q3 - q1)`` of
the tensor's importances, and keeps the base's elsewhere: ``out = a + (b - a) * mask``.

The quartiles are mergekit's approximation: the sorted importances indexed at
``int(q * (n - 1))`` with ``q`` in float32. Above one million elements mergekit sorts a sample of
one million indices drawn with replacement (``torch.randint``) from the global torch generator
that ``--random-seed`` seeds. Here those draws come from one CPU generator seeded with ``seed``,
one draw per such tensor in the order the engine visits them (sorted names), which gives
mergekit's masks for ``--random-seed seed`` on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MergeMethod, MergeOutput, Param, TensorJob, register
from .nearswap import one_fine_tune

QUANTILE_SAMPLE_SIZE = 1_000_000


def importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|params - base|`` times the per-row KL divergence of their softmaxes (mergekit's order)."""
    diff = (params - base).abs()
    eps = 1e-8
    p = F.softmax(params, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl_div = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl_div


def approximate_quantiles(scores: torch.Tensor, q: torch.Tensor,
                          generator: torch.Generator | None) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        index = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator)
        flat = flat[index.to(flat.device)]
    sorted_scores, _ = torch.sort(flat)
    return sorted_scores[(q.to(sorted_scores.device) * (sorted_scores.numel() - 1)).long()]


def fusion_mask(scores: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 0/1 mask of elements at or above the dynamic threshold, and the threshold."""
    q1, median, q3 = approximate_quantiles(scores, torch.tensor([0.25, 0.5, 0.75]), generator)
    threshold = median + 1.5 * (q3 - q1)
    return (scores >= threshold).to(scores.dtype), threshold


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "take the fine-tune's elements whose |change| x softmax-KL importance is an upper outlier, else the base"
    base_policy = "required"
    task_vectors = False
    # mergekit has no parameters here; ``seed`` stands for its --random-seed (used above 1M elements)
    params = (Param("seed", default=0, kind=int),)

    def __init__(self, recipe, num_layers: int | None = None) -> None:
        super().__init__(recipe, num_layers)
        self._generator: torch.Generator | None = None  # one stream for the whole merge

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        one_fine_tune(cls.name, recipe, source)

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.base is not None
        base, model = job.base, job.tensors[0]
        generator = None
        if model.numel() > QUANTILE_SAMPLE_SIZE:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(job.globals["seed"])
            generator = self._generator
        mask, _ = fusion_mask(importance(model, base), generator)
        return MergeOutput(base + (model - base) * mask, [float(mask.mean())])  # the share of elements taken
