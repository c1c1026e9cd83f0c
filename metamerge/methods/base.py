"""One interface for every merge method, and the registry that finds them by name.

A method declares its parameters (name, default, whether per model) and merges one tensor at a
time; the engine does everything else (reading, checking, writing, diagnostics). Adding a method
is adding one module with one registered class.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import MergeError

REQUIRED = object()
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Param:
    """A parameter a method reads from the recipe.

    ``per_model`` parameters may be set under each model's ``parameters`` (falling back to the
    recipe's global ``parameters``, then to the default), as mergekit does.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: type = float
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None
    hint: str = ""

    def coerce(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{where}: '{self.name}' must be true or false, not {value!r}")
            return value
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergeError(f"{where}: '{self.name}' must be a number, not {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise MergeError(f"{where}: '{self.name}' must be finite, not {value!r}")
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MergeError(f"{where}: '{self.name}' must be an integer, not {value!r}")
        elif self.kind is str and not isinstance(value, str):
            raise MergeError(f"{where}: '{self.name}' must be a string, not {value!r}")
        if self.choices and value not in self.choices:
            raise MergeError(f"{where}: '{self.name}' must be one of {', '.join(map(str, self.choices))}, not {value!r}")
        if self.check and not self.check(value):
            raise MergeError(f"{where}: bad value {value!r} for '{self.name}'{': ' + self.hint if self.hint else ''}")
        return value


def layer_fraction(tensor_name: str, num_layers: int | None) -> float:
    """Where a tensor sits in the depth of the model, 0..1, for mergekit's gradient parameters.

    Layer i of N maps to i/(N-1) (1 for a single layer); tensors outside the layer stack
    (embeddings, final norm, lm_head) map to 0, as in mergekit's plan for whole-model recipes.
    """
    m = _LAYER.search(tensor_name)
    if not m or not num_layers:
        return 0.0
    return 1.0 if num_layers < 2 else int(m.group(1)) / (num_layers - 1)


def evaluate_setting(value: Any, tensor_name: str, t: float) -> Any:
    """A parameter value for one tensor: a scalar, a gradient list, or a list of {filter, value}.

    Mirrors mergekit: a list of numbers is interpolated linearly at ``t``; a list of mappings
    picks the first whose ``filter`` is a substring of the tensor name (no filter matches all).
    """
    if not isinstance(value, list):
        return value
    if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        scaled = t * (len(value) - 1)
        i0 = int(math.floor(scaled))
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    for cond in value:
        if not isinstance(cond, dict):
            return value[int(t * (len(value) - 1))]
        filt = cond.get("filter")
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate_setting(cond.get("value"), tensor_name, t)
    return None


def _leaves(value: Any) -> list[Any]:
    """Every concrete value a (possibly list-shaped) parameter setting can produce."""
    if not isinstance(value, list):
        return [value]
    out: list[Any] = []
    for v in value:
        if isinstance(v, dict):
            extra = set(v) - {"filter", "value"}
            if extra or "value" not in v:
                raise MergeError(f"a conditional parameter needs keys 'filter' and 'value', got {sorted(v)}")
            out.extend(_leaves(v["value"]))
        else:
            out.append(v)
    return out


@dataclass
class TensorJob:
    """Everything a method needs to merge one tensor. Tensors are float32 (or wider).

    The method owns them: it may write into ``base`` and ``deltas`` in place (they are reused
    buffers, valid until the next tensor), and its output may be one of them.
    """

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]                # one per contributing model, recipe order
    deltas: list[torch.Tensor] | None          # task vectors after the method's sparsification
    params: list[dict[str, Any]]               # per-model parameters resolved for this tensor
    globals: dict[str, Any]                    # global parameters resolved for this tensor
    model_sqnorms: list[float] | None = None   # whole-model ||tau_t||^2, for methods that ask


@dataclass
class MergeOutput:
    tensor: torch.Tensor
    coefficients: list[float] | None = None    # the weight each model got (for the report)
    extra: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """Base class: subclasses set ``name``, ``params`` and implement ``merge``."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = True
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, recipe, num_layers: int | None = None):
        self.recipe = recipe
        self.num_layers = num_layers
        self.entries = self.input_entries(recipe)
        self._by_name = {p.name: p for p in self.params}

    @classmethod
    def input_entries(cls, recipe) -> list:
        """The models merged, in order: the fine-tunes for task-vector methods; for the others
        every listed model plus an unlisted ``base_model`` (mergekit appends it too)."""
        if cls.needs_base:
            return recipe.fine_tunes()
        entries = list(recipe.models)
        if recipe.base_model and all(m.model != recipe.base_model for m in entries):
            entries.append(type(entries[0])(model=recipe.base_model) if entries else None)
        return [e for e in entries if e is not None]

    # -- validation (before any tensor is read) -------------------------------------------------
    @classmethod
    def validate_recipe(cls, recipe, source: str) -> None:
        known = {p.name: p for p in cls.params}
        where = f"{source}: {cls.name}"
        for key, value in recipe.parameters.items():
            if key not in known:
                raise MergeError(f"{where}: unknown parameter '{key}' (known: {', '.join(sorted(known)) or 'none'})")
            for leaf in _leaves(value):
                known[key].coerce(leaf, f"{where} parameters")
        if cls.needs_base:
            if not recipe.base_model:
                raise MergeError(f"{where} needs base_model: the model the fine-tunes were trained from")
            for m in recipe.models:
                if m.model == recipe.base_model and m.parameters:
                    raise MergeError(f"{source}: base model '{m.model}' is also listed as a fine-tune with "
                                     "parameters; its task vector is zero: remove it from models")
        entries = cls.input_entries(recipe)
        if not entries:
            raise MergeError(f"{source}: no models to merge; list at least one fine-tune under models")
        seen = set()
        for m in entries:
            if m.model in seen:
                raise MergeError(f"{source}: model '{m.model}' is listed twice")
            seen.add(m.model)
            for key, value in m.parameters.items():
                p = known.get(key)
                if p is None or not p.per_model:
                    per = sorted(n for n, q in known.items() if q.per_model)
                    raise MergeError(f"{where}: unknown per-model parameter '{key}' for '{m.model}' "
                                     f"(known: {', '.join(per) or 'none'})")
                for leaf in _leaves(value):
                    p.coerce(leaf, f"{where} model '{m.model}'")
            for p in known.values():
                if p.per_model and p.default is REQUIRED and p.name not in m.parameters \
                        and p.name not in recipe.parameters:
                    raise MergeError(f"{where}: model '{m.model}' needs parameter '{p.name}'")
        for p in known.values():
            if not p.per_model and p.default is REQUIRED and p.name not in recipe.parameters:
                raise MergeError(f"{where} needs parameter '{p.name}'")

    # -- resolution per tensor ------------------------------------------------------------------
    def _value(self, p: Param, settings: list[dict], tensor_name: str) -> Any:
        t = layer_fraction(tensor_name, self.num_layers)
        for s in settings:
            if p.name in s:
                v = evaluate_setting(s[p.name], tensor_name, t)
                if v is not None:
                    return p.coerce(v, f"{self.name} tensor '{tensor_name}'")
        if p.default is REQUIRED:
            raise MergeError(f"{self.name}: no value of '{p.name}' applies to tensor '{tensor_name}'")
        return p.default

    def resolve(self, tensor_name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Global and per-model parameter values for one tensor."""
        g = {p.name: self._value(p, [self.recipe.parameters], tensor_name)
             for p in self.params if not p.per_model}
        per = [{p.name: self._value(p, [e.parameters, self.recipe.parameters], tensor_name)
                for p in self.params if p.per_model} for e in self.entries]
        return g, per

    # -- the work -------------------------------------------------------------------------------
    def needs_model_sqnorms(self) -> bool:
        """True when the merge needs whole-model task-vector norms first (a pass of its own)."""
        return False

    def sparsify(self, tensor_name: str, model_key: str, tau: torch.Tensor,
                 params: dict[str, Any], globals_: dict[str, Any]) -> torch.Tensor:
        """The task vector this method actually uses; identity unless the method sparsifies."""
        return tau

    def merge(self, job: TensorJob) -> MergeOutput:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str, source: str = "recipe") -> type[MergeMethod]:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise MergeError(f"{source}: unknown merge_method '{name}' (available: {', '.join(sorted(_REGISTRY))})")
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
