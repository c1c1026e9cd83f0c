"""``metagpt``: model-exclusive task arithmetic (Zhou et al. 2024).

The coefficient of fine-tune t is

    lambda_t = ||tau_t||^2 / sum_k ||tau_k||^2

the closed-form minimiser of the average loss difference under local linearity and orthogonal
task vectors (see shared METAGPT.md). With ``granularity: model`` (the paper's Eq. 15, default)
the norms are summed over the whole model, so the engine runs a norm pass first and hands the
sums in as ``job.model_stats``; with ``granularity: tensor`` each tensor gets its own lambdas.
With ``sparsify: dare|ties|breadcrumbs|della`` the task vectors are sparsified first and lambda
comes from the sparsified vectors (the paper's "MetaGPT + DARE / + TIES"). This module is the one
place the MetaGPT coefficient is computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import sparsify as sp
from ..reduce import det_sqnorm, sqnorm_blocks
from .base import MergeMethod, MergeOutput, Param, TensorJob, register
from .params import leaves
from .sparsifiers import DENSITY, SPARSIFIERS


def metagpt_lambdas(sqnorms: list[float]) -> list[float]:
    """The MetaGPT coefficients from squared task-vector norms; all zero when nothing changed."""
    total = math.fsum(sqnorms)  # exact: the same whatever order the norms were gathered in
    if total == 0.0:
        return [0.0] * len(sqnorms)
    return [float(s) / total for s in sqnorms]


def squared_norm(t: torch.Tensor) -> float:
    """||t||^2 in float64, summed in a fixed order so lambda is the same on any thread count."""
    return det_sqnorm(t)


# MetaGPT's `sparsify:` values -> rows of the sparsifier table. DARE rescales by 1/density (the
# DARE paper, as MetaGPT's "+ DARE" uses it), so it is not the family's L1-rescaled "random" row.
SPARSIFY = {"none": "none", "dare": "random", "ties": "magnitude", "breadcrumbs": "magnitude_outliers",
            "della": "della_magprune"}


@register
class MetaGPT(MergeMethod):
    name = "metagpt"
    summary = "model-exclusive task arithmetic: lambda_t = ||tau_t||^2 / sum_k ||tau_k||^2, no data, no search"
    params = (
        Param("granularity", default="model", kind=str, choices=("model", "tensor")),
        Param("sparsify", default="none", kind=str, choices=tuple(SPARSIFY)),
        Param("density", default=1.0, per_model=True, **DENSITY),
        *(p for row in SPARSIFY.values() for p in SPARSIFIERS[row].params),
        Param("rescale", default=True, kind=bool),
        Param("seed", default=0, kind=int),
    )
    model_statistic = "sqnorm"

    def needs_model_statistics(self) -> bool:
        # Anything but a plain "tensor" (a filter list too) may resolve to "model" on some tensor.
        return self.recipe.parameters.get("granularity", "model") != "tensor"

    def random_sparsification(self) -> bool:
        # any value the setting can take (a filter list or a list over layers too) may draw masks
        values = leaves(self.recipe.parameters.get("sparsify", "none"))
        return any(SPARSIFIERS[SPARSIFY[v]].random for v in values)

    def sparsifies(self, globals_: dict[str, Any]) -> bool:
        return globals_["sparsify"] != "none"

    def sparsify(self, tensor_name: str, index: int, tau: torch.Tensor,
                 params: dict[str, Any], globals_: dict[str, Any]) -> torch.Tensor:
        how = globals_["sparsify"]
        if how == "none":
            return tau
        if how == "dare":
            return sp.dare(tau, params["density"], self._generator(globals_, index, tensor_name),
                           rescale="inverse" if globals_["rescale"] else None)
        row = SPARSIFIERS[SPARSIFY[how]]
        gen = self._generator(globals_, index, tensor_name) if row.random else None
        # TIES and breadcrumbs keep the surviving entries as they are; DELLA rescales (L1) if asked
        return row.apply(tau, params, gen, globals_["rescale"] and row.random)

    def _generator(self, globals_: dict[str, Any], index: int, tensor_name: str) -> torch.Generator:
        # One generator per (seed, model, tensor): the mask does not depend on which other
        # fine-tunes are merged, so a fine-tune's norms can be cached on their own.
        return torch.Generator().manual_seed(sp.seed_for(globals_["seed"], self.entries[index].model, tensor_name))

    def tensor_statistic(self, tensor_name: str, index: int, delta: torch.Tensor) -> float:
        return squared_norm(delta)

    def elementwise(self) -> bool:
        # whole-model lambdas and no sparsification: theta_0 + sum_t lambda_t tau_t, entry by entry
        p = self.recipe.parameters
        return p.get("granularity", "model") == "model" and all(v == "none" for v in leaves(p.get("sparsify", "none")))

    def tensor_statistic_blocks(self, tensor_name: str, index: int, delta: torch.Tensor) -> list[float] | None:
        return sqnorm_blocks(delta)

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.deltas is not None and job.base is not None
        if job.globals["granularity"] == "model":
            assert job.model_stats is not None
            sq = job.model_stats
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

    def report_fields(self) -> dict[str, Any]:
        return {"granularity": self.recipe.parameters.get("granularity", "model")}

    def model_report(self, model_stats: list[float] | None, labels: list[str]) -> dict[str, Any]:
        if model_stats is None:
            return {}
        return {"lambdas": dict(zip(labels, metagpt_lambdas(model_stats)))}
