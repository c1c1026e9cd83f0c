"""``model_stock``: Model Stock (Jang et al., 2024), mergekit 0.1.5's ``model_stock``.

The fine-tunes' offsets from the base are compared pairwise: their mean cosine ``cos`` gives the
interpolation ratio ``t = N cos / (1 + (N - 1) cos)`` between the fine-tunes' average and the base,
``out = t * mean(w_i) + (1 - t) * w_0``. With ``filter_wise`` the ratio is per row (a 1-D tensor is
one row); otherwise one ratio per tensor. The operations are mergekit's, in its order: cosines are
clamped to [-1, 1] with norm products floored at 1e-6, and where ``1 + (N - 1) cos`` is within 1e-6
of zero the base is kept (``t = 0``).
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def model_stock(w_0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model Stock of raw weights ``ws`` around the base ``w_0`` (mergekit's kernel, op for op),
    and the ratio ``t`` (one per row with ``filter_wise``)."""
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]

    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for idx, a in enumerate(offsets):
        for b in offsets[idx + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))

    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape), t


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "Model Stock: move from the base toward the fine-tunes' mean by their offsets' mean cosine"
    base_policy = "required"
    task_vectors = False  # mergekit's kernel works on the raw weights
    params = (Param("filter_wise", default=False, kind=bool),)

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        n = len(cls.input_entries(recipe))
        if n < 2:
            raise MergeError(f"{source}: model_stock needs at least two fine-tunes besides base_model "
                             f"(got {n}); it compares their offsets from the base pairwise")

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.base is not None
        out, t = model_stock(job.base, job.tensors, job.globals["filter_wise"])
        share = float(t.mean()) / len(job.tensors)  # each fine-tune's weight in the result (mean over rows)
        return MergeOutput(out, [share] * len(job.tensors))
