"""The task-arithmetic family: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``.

One computation (mergekit's generalized task arithmetic) with two switches, given per method in
``FAMILY`` as data: which sparsification each task vector goes through (a row of
``sparsifiers.SPARSIFIERS``) and whether signs are elected (TIES's consensus). The operation order
is mergekit 0.1.5's, so the same recipe gives the same tensors: random masks come from one CPU
generator seeded with ``seed`` (mergekit's ``--random-seed``), drawn in sorted tensor-name order,
one per fine-tune in recipe order, as the engine visits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import sparsify as sp
from .base import MergeMethod, MergeOutput, Param, TensorJob, register
from .sparsifiers import DENSITY, SPARSIFIERS


@dataclass(frozen=True)
class Variant:
    sparsifier: str             # a key of SPARSIFIERS
    consensus: str | None       # None | "sum" (TIES sign election)
    normalize: bool             # default of `normalize`
    rescale: bool               # default of `rescale`
    summary: str


FAMILY: dict[str, Variant] = {
    "task_arithmetic": Variant("none", None, False, False, "base + lambda * sum_t weight_t * tau_t"),
    "ties": Variant("magnitude", "sum", True, False,
                    "trim each task vector to its top-density entries, elect signs, disjoint weighted mean"),
    "dare_linear": Variant("random", None, False, True, "DARE random drop (rescaled), then task arithmetic"),
    "dare_ties": Variant("random", "sum", False, True, "DARE random drop (rescaled), then TIES sign election"),
    "breadcrumbs": Variant("magnitude_outliers", None, False, False,
                           "drop the largest (gamma) and smallest entries, then task arithmetic"),
    "breadcrumbs_ties": Variant("magnitude_outliers", "sum", False, False,
                                "breadcrumbs sparsification, then TIES sign election"),
    "della": Variant("della_magprune", "sum", True, True,
                     "DELLA: magnitude-ranked drop probabilities (epsilon), then TIES sign election"),
    "della_linear": Variant("della_magprune", None, False, True, "DELLA drop, then task arithmetic"),
}


class GeneralTaskArithmetic(MergeMethod):
    """One member of the family; ``variant`` is set per registered subclass."""

    variant: Variant

    def __init__(self, recipe, num_layers=None):
        super().__init__(recipe, num_layers)
        self._sparsifier = SPARSIFIERS[self.variant.sparsifier]
        self._generator: torch.Generator | None = None  # one stream for the whole merge

    def random_sparsification(self) -> bool:
        return self._sparsifier.random

    def elementwise(self) -> bool:
        return self.variant.sparsifier == "none"  # weights, sign election and normalising: per entry

    def order_dependent(self) -> bool:
        return self._sparsifier.random  # one generator, drawn in plan order (mergekit's --random-seed)

    def sparsify(self, tensor_name: str, index: int, tau: torch.Tensor,
                 params: dict[str, Any], globals_: dict[str, Any]) -> torch.Tensor:
        if self._sparsifier.random and self._generator is None:
            self._generator = torch.Generator().manual_seed(globals_["seed"])
        return self._sparsifier.apply(tau, params, self._generator, globals_["rescale"])

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.deltas is not None and job.base is not None
        deltas = torch.stack(job.deltas, dim=0)
        weights = torch.tensor([p["weight"] for p in job.params], dtype=deltas.dtype, device=deltas.device)
        w = weights.view(-1, *([1] * (deltas.dim() - 1)))
        weighted = deltas * w
        consensus = self.variant.consensus
        if consensus:
            mask = sp.sign_consensus(weighted, consensus)
            mixed = (weighted * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if job.globals["normalize"]:
            mixed /= divisor
        lam = job.globals["lambda"]
        if lam != 1:
            mixed *= lam
        coeffs = [p["weight"] * lam for p in job.params]
        if job.globals["normalize"] and not consensus:
            total = sum(p["weight"] for p in job.params)
            coeffs = [c / total for c in coeffs] if abs(total) >= 1e-8 else coeffs
        return MergeOutput(mixed.add_(job.base), coeffs)  # a + b == b + a, bit for bit


def _params(v: Variant) -> tuple[Param, ...]:
    return (
        Param("weight", per_model=True),
        Param("density", default=1.0, per_model=True, **DENSITY),
        *SPARSIFIERS[v.sparsifier].params,
        Param("lambda", default=1.0),
        Param("normalize", default=v.normalize, kind=bool),
        Param("rescale", default=v.rescale, kind=bool),
        Param("int8_mask", default=False, kind=bool),
        Param("seed", default=0, kind=int),
    )


for _name, _variant in FAMILY.items():
    register(type(f"TaskArithmetic_{_name}", (GeneralTaskArithmetic,),
                  {"name": _name, "variant": _variant, "params": _params(_variant), "summary": _variant.summary,
                   "__module__": __name__, "__doc__": f"``{_name}``: {_variant.summary}."}))
