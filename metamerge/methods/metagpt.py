"""``metagpt``: model-exclusive task arithmetic (Zhou et al. 2024).

The coefficient of fine-tune t is

    lambda_t = ||tau_t||^2 / sum_k ||tau_k||^2

the closed-form minimiser of the average loss difference under local linearity and orthogonal
task vectors (see shared METAGPT.md). With ``granularity: model`` (the paper's Eq. 15, default)
the norms are summed over the whole model, so the engine runs a norm pass first and hands the
sums in as ``job.model_sqnorms``; with ``granularity: tensor`` each tensor gets its own lambdas.
With ``sparsify: dare|ties`` the task vectors are sparsified first and lambda comes from the
sparsified vectors (the paper's "MetaGPT + DARE / + TIES").
"""

from __future__ import annotations

from typing import Any

import torch

from .. import sparsify as sp
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def metagpt_lambdas(sqnorms: list[float]) -> list[float]:
    """The MetaGPT coefficients from squared task-vector norms; all zero when nothing changed."""
    total = float(sum(sqnorms))
    if total == 0.0:
        return [0.0] * len(sqnorms)
    return [float(s) / total for s in sqnorms]


def squared_norm(t: torch.Tensor, chunk: int = 1 << 20) -> float:
    """||t||^2: float32 (or wider) dot products per chunk, summed in float64.

    Chunking bounds the float32 accumulation error to a million terms while keeping the fast
    vectorised dot; no float64 copy of the tensor is made.
    """
    flat = t.reshape(-1)
    if not flat.dtype.is_floating_point or flat.element_size() < 4:
        flat = flat.float()
    return float(sum(float(torch.dot(part, part)) for part in flat.split(chunk)))


@register
class MetaGPT(MergeMethod):
    name = "metagpt"
    params = (
        Param("granularity", default="model", kind=str, choices=("model", "tensor")),
        Param("sparsify", default="none", kind=str, choices=("none", "dare", "ties")),
        Param("density", default=1.0, per_model=True, check=lambda d: 0 < d <= 1,
              hint="density is the fraction kept, in (0, 1]"),
        Param("rescale", default=True, kind=bool),
        Param("seed", default=0, kind=int),
    )

    def needs_model_sqnorms(self) -> bool:
        # Anything but a plain "tensor" (a filter list too) may resolve to "model" on some tensor.
        return self.recipe.parameters.get("granularity", "model") != "tensor"

    def sparsify(self, tensor_name: str, model_key: str, tau: torch.Tensor,
                 params: dict[str, Any], globals_: dict[str, Any]) -> torch.Tensor:
        how = globals_["sparsify"]
        if how == "ties":
            return sp.magnitude(tau, params["density"])
        if how == "dare":
            # One generator per (seed, model, tensor): the mask does not depend on which other
            # fine-tunes are merged, so a fine-tune's norms can be cached on their own.
            gen = torch.Generator().manual_seed(sp.seed_for(globals_["seed"], model_key, tensor_name))
            return sp.dare(tau, params["density"], gen, rescale="inverse" if globals_["rescale"] else None)
        return tau

    def merge(self, job: TensorJob) -> MergeOutput:
        if job.globals["granularity"] == "model":
            sq = job.model_sqnorms
        else:
            sq = [squared_norm(d) for d in job.deltas]
        lambdas = metagpt_lambdas(sq)
        if not any(lambdas):  # no fine-tune changed anything: the base, exactly
            return MergeOutput(job.base, lambdas)
        if job.globals["sparsify"] == "ties":
            # TIES on top: elect signs over the lambda-weighted vectors, then a disjoint mean.
            deltas = torch.stack(job.deltas, dim=0)
            w = torch.tensor(lambdas, dtype=deltas.dtype, device=deltas.device)
            w = w.view(-1, *([1] * (deltas.dim() - 1)))
            weighted = deltas * w
            mask = sp.sign_consensus(weighted, "sum")
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            return MergeOutput(job.base + (weighted * mask).sum(dim=0) / divisor, lambdas)
        out = job.base  # accumulate in place: the base buffer is not needed after this tensor
        for lam, delta in zip(lambdas, job.deltas):
            out.add_(delta, alpha=lam)
        return MergeOutput(out, lambdas)
