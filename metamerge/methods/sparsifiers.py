"""The sparsifications a task vector can go through, as a table of data.

The task-arithmetic family (``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``) and MetaGPT's
``sparsify:`` option both pick a row of this table; each row names the per-model parameters it
reads beyond ``density`` and how it applies. Random rows draw from a generator the caller owns
(one stream per merge as in mergekit, or one per (model, tensor) for MetaGPT's cacheable norms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import sparsify as sp
from .params import Param

DENSITY: dict[str, Any] = dict(check=lambda d: 0 < d <= 1, hint="density is the fraction kept, in (0, 1]")

# apply(tau, per-model params, generator or None, rescale) -> sparsified tau
Apply = Callable[[torch.Tensor, dict[str, Any], "torch.Generator | None", bool], torch.Tensor]


@dataclass(frozen=True)
class Sparsifier:
    name: str
    params: tuple[Param, ...]   # per-model parameters it reads besides density
    random: bool
    apply: Apply


def _random(tau, p, gen, rescale):
    assert gen is not None, "a random sparsifier needs the caller's generator"
    return sp.dare(tau, p["density"], gen, rescale="l1" if rescale else None)


def _della(tau, p, gen, rescale):
    from ..errors import MergeError

    if p["density"] < 1 and not (0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] < 1):
        raise MergeError(f"della: epsilon {p['epsilon']} must keep density +/- epsilon inside (0, 1) "
                         f"(density {p['density']}); lower epsilon")
    return sp.della_magprune(tau, p["density"], p["epsilon"], gen, rescale=rescale)


SPARSIFIERS: dict[str, Sparsifier] = {s.name: s for s in (
    Sparsifier("none", (), False, lambda tau, p, gen, rescale: tau),
    Sparsifier("magnitude", (), False,
               lambda tau, p, gen, rescale: sp.magnitude(tau, p["density"], rescale=rescale)),
    Sparsifier("random", (), True, _random),
    Sparsifier("magnitude_outliers", (Param("gamma", default=0.01, per_model=True),), False,
               lambda tau, p, gen, rescale: sp.magnitude_outliers(tau, p["density"], p["gamma"], rescale=rescale)),
    Sparsifier("della_magprune", (Param("epsilon", default=0.15, per_model=True),), True, _della),
)}
