"""The method contract: one interface every merge method fits, and the registry that finds them.

A method declares, as class data the engine reads:

- ``params``: what it reads from the recipe (name, default, per model or global, type);
- ``base_policy``: whether ``base_model`` is the reference the others are measured from
  (``required``/``optional``) or just one more input to combine (``input``, as ``linear``);
- ``task_vectors``: whether it merges task vectors ``theta_t - theta_0`` (the engine subtracts the
  base and applies ``sparsify``) or the raw tensors (slerp-like methods get the base and the models
  as they are);
- ``model_statistic``: a whole-model quantity it needs before the first tensor is merged (MetaGPT's
  squared norms), computed by a pass of its own from ``tensor_statistic`` and summed per model, so
  a caller can cache it per fine-tune under ``statistics_key``;
- ``model_report``/``report_fields``: what it adds to the merge report.

The engine knows no method by name: it resolves parameters, reads tensors, and calls ``merge`` with
a ``TensorJob`` per tensor. Adding a method is adding one module with one registered class.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import MergeError
from .params import REQUIRED, Param, ParamScope, evaluate_setting, layer_fraction, leaves

__all__ = ["MergeMethod", "MergeOutput", "Param", "ParamScope", "RecipeWarning", "TensorJob", "available_methods",
           "evaluate_setting", "get_method", "layer_fraction", "register"]

BASE_POLICIES = ("required", "optional", "input")


class RecipeWarning(UserWarning):
    """A recipe that runs but carries something the method ignores (mergekit ignores it silently)."""


@dataclass
class TensorJob:
    """Everything a method needs to merge one tensor. Tensors are in the compute dtype (float32 or
    wider) on the merge device.

    For a method with a base, ``base`` is the base's tensor. A task-vector method gets ``deltas``
    (each model's task vector after its ``sparsify``) and no ``tensors``; a raw-tensor method gets
    ``tensors`` (one per entry, recipe order) and ``deltas`` is None. The method owns these buffers:
    it may write into them in place (they are reused, valid until the next tensor), and its output
    may be one of them.
    """

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    deltas: list[torch.Tensor] | None
    params: list[dict[str, Any]]               # per-model parameters resolved for this tensor
    globals: dict[str, Any]                    # global parameters resolved for this tensor
    model_stats: list[float] | None = None     # the method's whole-model statistic, one per entry


@dataclass
class MergeOutput:
    tensor: torch.Tensor
    coefficients: list[float] | None = None    # the weight each model got (for the report)
    extra: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """Base class: subclasses set the class data above and implement ``merge``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""                # one line for `metamerge methods` and the README
    params: ClassVar[tuple[Param, ...]] = ()
    base_policy: ClassVar[str] = "required"
    task_vectors: ClassVar[bool] = True
    model_statistic: ClassVar[str | None] = None

    def __init__(self, recipe, num_layers: int | None = None):
        self.recipe = recipe
        self.num_layers = num_layers
        self.entries = self.input_entries(recipe)

    # -- inputs ---------------------------------------------------------------------------------
    @classmethod
    def uses_base(cls, recipe) -> bool:
        """Whether ``base_model`` is the reference the merged models are measured from."""
        return cls.base_policy == "required" or (cls.base_policy == "optional" and bool(recipe.base_model))

    @property
    def has_base(self) -> bool:
        return self.uses_base(self.recipe)

    @classmethod
    def input_entries(cls, recipe) -> list:
        """The models merged, in order: with a base, every entry but a parameter-less base (mergekit
        recipes often list it again); without one, every listed model plus an unlisted
        ``base_model`` (mergekit appends it too)."""
        if cls.uses_base(recipe):
            return recipe.fine_tunes()
        entries = list(recipe.models)
        if recipe.base_model and all(m.model != recipe.base_model for m in entries):
            entries.append(recipe.entry(recipe.base_model))
        return entries

    # -- validation (before any tensor is read) -------------------------------------------------
    @classmethod
    def validate_recipe(cls, recipe, source: str) -> None:
        known = {p.name: p for p in cls.params}
        where = f"{source}: {cls.name}"
        for key, value in recipe.parameters.items():
            if key not in known:
                _unused(key, cls.name, where, "parameters", sorted(known))
                continue
            for leaf in leaves(value):
                known[key].coerce(leaf, f"{where} parameters")
        if cls.uses_base(recipe):
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
                per = sorted(n for n, q in known.items() if q.per_model)
                if p is not None and not p.per_model:  # read once for all models: a per-model value has no effect
                    raise MergeError(f"{where}: unknown per-model parameter '{key}' for '{m.model}': it is global, "
                                     f"set it under the recipe's parameters (known: {', '.join(per) or 'none'})")
                if p is None:
                    _unused(key, cls.name, where, f"model '{m.model}' parameters", per)
                    continue
                for leaf in leaves(value):
                    p.coerce(leaf, f"{where} model '{m.model}'")
            for p in known.values():
                if p.per_model and p.default is REQUIRED and p.name not in m.parameters \
                        and p.name not in recipe.parameters:
                    raise MergeError(f"{where}: model '{m.model}' needs parameter '{p.name}'")
        for p in known.values():
            if not p.per_model and p.default is REQUIRED and p.name not in recipe.parameters:
                raise MergeError(f"{where} needs parameter '{p.name}'")
        cls.validate_inputs(recipe, source)

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        """Method-specific checks of the recipe (e.g. exactly two models); none by default."""

    # -- resolution per tensor ------------------------------------------------------------------
    def _value(self, p: Param, settings, tensor_name: str, t: float | None = None) -> Any:
        """The first setting (highest precedence first) that gives ``p`` a value for this tensor;
        a filter list that matches nothing falls through to the next, as in mergekit."""
        if t is None:
            t = layer_fraction(tensor_name, self.num_layers)
        for s in settings:
            if p.name in s:
                v = evaluate_setting(s[p.name], tensor_name, t, convert=p.lax)
                if v is not None:
                    return p.coerce(v, f"{self.name} tensor '{tensor_name}'")
        if p.default is REQUIRED:
            raise MergeError(f"{self.name}: no value of '{p.name}' applies to tensor '{tensor_name}'")
        return p.default

    def resolve(self, tensor_name: str, scope: ParamScope | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Global and per-model parameter values for one tensor.

        Without ``scope`` (a whole-model recipe): the recipe's entries, their parameters over the
        recipe's, gradients at the tensor's layer. A ``scope`` (a slices recipe) gives the entries'
        settings, the tensor name each entry is read under and the gradient position instead.
        """
        if scope is None:
            g = {p.name: self._value(p, [self.recipe.parameters], tensor_name)
                 for p in self.params if not p.per_model}
            per = [{p.name: self._value(p, [e.parameters, self.recipe.parameters], tensor_name)
                    for p in self.params if p.per_model} for e in self.entries]
            return g, per
        g = {p.name: self._value(p, scope.shared, tensor_name, scope.t) for p in self.params if not p.per_model}
        per = [{p.name: self._value(p, settings, name, scope.t) for p in self.params if p.per_model}
               for settings, name in zip(scope.per_entry, scope.names)]
        return g, per

    # -- whole-model statistics (a pass of their own) -------------------------------------------
    def needs_model_statistics(self) -> bool:
        """True when the merge needs ``model_statistic`` of every entry before the first tensor."""
        return self.model_statistic is not None

    def tensor_statistic(self, tensor_name: str, index: int, delta: torch.Tensor) -> float:
        """This tensor's share of entry ``index``'s whole-model statistic (summed over tensors in
        float64). ``delta`` is the task vector after ``sparsify``."""
        raise NotImplementedError(f"{self.name} declares no model statistic")

    def statistics_key(self, index: int) -> dict[str, Any]:
        """Everything entry ``index``'s statistic depends on besides the base's and the model's
        content: the cache key of a per-fine-tune statistic (JSON-able)."""
        entry = self.entries[index]
        return {"method": self.name, "statistic": self.model_statistic, "parameters": self.recipe.parameters,
                "model_parameters": entry.parameters, "dtype": self.recipe.dtype,
                "vocab_policy": self.recipe.vocab_policy,
                "seed_key": entry.model if self.random_sparsification() else None}

    # -- the work -------------------------------------------------------------------------------
    def random_sparsification(self) -> bool:
        """Whether ``sparsify`` draws random numbers (its masks then depend on a seed and order)."""
        return False

    def elementwise(self) -> bool:
        """Whether ``sparsify`` and ``merge`` act on each entry of a tensor alone (given the
        whole-model statistics): such a method gets large tensors a chunk at a time (a few MB in
        cache instead of several copies of a 500 MB embedding), with the same bytes as whole."""
        return False

    def tensor_statistic_blocks(self, tensor_name: str, index: int, delta: torch.Tensor) -> list[float] | None:
        """``tensor_statistic`` as block sums that add up (fsum) to it over a tensor's chunks, for
        an elementwise method whose statistic is such a sum; None when it is not."""
        return None

    def order_dependent(self) -> bool:
        """Whether a tensor's result depends on the tensors merged before it (one random stream
        drawn across tensors, as mergekit's DARE does): such a merge runs its units in plan order in
        one process, and does not resume (the stream cannot be re-entered midway)."""
        return False

    def sparsifies(self, globals_: dict[str, Any]) -> bool:
        """Whether ``sparsify`` may change a task vector under these global parameters (then a
        statistic must be taken of the sparsified vector, not computed from a LoRA's factors)."""
        return type(self).sparsify is not MergeMethod.sparsify

    def sparsify(self, tensor_name: str, index: int, tau: torch.Tensor,
                 params: dict[str, Any], globals_: dict[str, Any]) -> torch.Tensor:
        """The task vector of entry ``index`` this method actually uses; identity by default."""
        return tau

    def merge(self, job: TensorJob) -> MergeOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- reporting ------------------------------------------------------------------------------
    def report_fields(self) -> dict[str, Any]:
        """Top-level fields of the merge report this method adds (e.g. MetaGPT's granularity)."""
        return {}

    def model_report(self, model_stats: list[float] | None, labels: list[str]) -> dict[str, Any]:
        """Whole-model entries of the report from the statistic, e.g. ``{"lambdas": {...}}``."""
        return {}


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.base_policy not in BASE_POLICIES:
        raise ValueError(f"{cls.__name__}.base_policy must be one of {BASE_POLICIES}")
    if cls.name in _REGISTRY:
        raise ValueError(f"merge method '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str, source: str = "recipe") -> type[MergeMethod]:
    cls = _REGISTRY.get(name)
    if cls is None:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise MergeError(f"{source}: unknown merge_method '{name}' ({hint}available: {', '.join(sorted(_REGISTRY))})")
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def known_parameters() -> set[str]:
    """Every parameter name some registered method reads."""
    return {p.name for cls in _REGISTRY.values() for p in cls.params}


def _unused(key: str, method: str, where: str, section: str, valid: list[str]) -> None:
    """A parameter the method does not read: a warning when another method reads it (a leftover
    mergekit ignores too), an error with the nearest valid name when no method knows it (a typo)."""
    if key in known_parameters():
        warnings.warn(f"{where}: parameter '{key}' in {section} is not used by {method}; it is ignored",
                      RecipeWarning, stacklevel=4)
        return
    near = difflib.get_close_matches(key, valid, n=1) or difflib.get_close_matches(key, sorted(known_parameters()), n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise MergeError(f"{where}: unknown parameter '{key}' in {section} ({hint}known: {', '.join(valid) or 'none'})")
