"""The task-arithmetic family: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``.

One computation with two switches, as in mergekit's generalized task arithmetic: how each task
vector is sparsified (none, magnitude = TIES trim, random = DARE) and whether signs are elected
(TIES). The operation order is mergekit 0.1.5's, so the same recipe gives the same tensors:
DARE masks come from one CPU generator seeded with ``seed`` (mergekit's ``--random-seed``) and
drawn in sorted tensor-name order, one per fine-tune in recipe order, as the engine visits them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import sparsify as sp
from .base import MergeMethod, MergeOutput, Param, TensorJob, register

_DENSITY = dict(check=lambda d: 0 < d <= 1, hint="density is the fraction kept, in (0, 1]")
COMMON = (
    Param("weight", per_model=True),
    Param("density", default=1.0, per_model=True, **_DENSITY),
    Param("lambda", default=1.0),
    Param("int8_mask", default=False, kind=bool),
    Param("seed", default=0, kind=int),
)


class GeneralTaskArithmetic(MergeMethod):
    sparsification: ClassVar[str | None] = None  # None | "magnitude" | "random"
    consensus: ClassVar[str | None] = None       # None | "sum"
    default_normalize: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.params = COMMON + (Param("normalize", default=cls.default_normalize, kind=bool),
                               Param("rescale", default=cls.sparsification == "random", kind=bool))

    def __init__(self, recipe, num_layers=None):
        super().__init__(recipe, num_layers)
        self._generator: torch.Generator | None = None  # one stream for the whole merge

    def sparsify(self, tensor_name: str, model_key: str, tau: torch.Tensor,
                 params: dict[str, Any], globals_: dict[str, Any]) -> torch.Tensor:
        density = params["density"]
        if self.sparsification == "magnitude":
            return sp.magnitude(tau, density, rescale=globals_["rescale"])
        if self.sparsification == "random":
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(globals_["seed"])
            return sp.dare(tau, density, self._generator, rescale="l1" if globals_["rescale"] else None)
        return tau

    def merge(self, job: TensorJob) -> MergeOutput:
        deltas = torch.stack(job.deltas, dim=0)
        weights = torch.tensor([p["weight"] for p in job.params], dtype=deltas.dtype, device=deltas.device)
        w = weights.view(-1, *([1] * (deltas.dim() - 1)))
        weighted = deltas * w
        if self.consensus:
            mask = sp.sign_consensus(weighted, self.consensus)
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
        if job.globals["normalize"] and not self.consensus:
            total = sum(p["weight"] for p in job.params)
            coeffs = [c / total for c in coeffs] if abs(total) >= 1e-8 else coeffs
        return MergeOutput(mixed.add_(job.base), coeffs)  # a + b == b + a, bit for bit


@register
class TaskArithmetic(GeneralTaskArithmetic):
    name = "task_arithmetic"


@register
class Ties(GeneralTaskArithmetic):
    name = "ties"
    sparsification = "magnitude"
    consensus = "sum"
    default_normalize = True


@register
class DareLinear(GeneralTaskArithmetic):
    name = "dare_linear"
    sparsification = "random"


@register
class DareTies(GeneralTaskArithmetic):
    name = "dare_ties"
    sparsification = "random"
    consensus = "sum"
