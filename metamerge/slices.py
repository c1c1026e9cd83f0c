"""Slices: mergekit's layer stacking ("frankenmerges"), validated and planned from headers only.

A ``slices`` recipe lists output slices. Each slice takes the same number of layers from each of
its sources (``layer_range: [start, end)``) and merges them with the recipe's method; the output's
layers are the slices' layers one after another. This follows mergekit 0.1.5's ``MergePlanner``
(plan.py) and ``ConfigReader`` (config.py):

- output layer ``offset + k`` of a slice reads layer ``start + k`` of each of its sources;
- the tensors before the layers (embeddings) are merged over the first slice's sources, the ones
  after them (final norm, lm_head) over the last slice's, with that slice's parameters and base.
  mergekit gathers only the first ``len(first slice's sources)`` of the last slice's sources for
  those (it zips them with the first slice's weight list); so does this;
- gradients are evaluated at ``t = k / (length - 1)``, the position inside the slice (1 for a
  one-layer slice), and at 0 for the tensors outside the layers;
- parameters resolve source, then slice, then recipe; a model's own parameters are matched
  against the name it is read under (``model.layers.{start + k}...``), global ones against the
  output name;
- a slice's base is its ``base_model`` or the recipe's; a method that uses a base needs it among
  the slice's sources (that is where its layers come from). A slice of only its base gives the
  base's layers as they are for a task-vector method (mergekit's task arithmetic returns the base
  when there is nothing to add);
- ``config.json`` is the base model's (else the first source's) with the layer count set to the
  number of output layers (and ``layer_types`` rebuilt to match, which mergekit does not do: its
  config then fails to load under transformers 5).

Methods stay unaware of slices: each output tensor gets a ``TensorSource`` saying which tensor of
which model each entry is, and a ``ParamScope`` for its parameters.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from .checks import Plan, TensorSource
from .errors import MergeError
from .io import ModelReader
from .methods.base import MergeMethod, RecipeWarning
from .methods.params import ParamScope
from .recipe import ModelEntry, OutputSlice, Recipe, SliceSource

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# Tensors before the layer stack: the embeddings (mergekit's pre_weights for every architecture
# it knows are embeddings, their norms, positions and rotary tables); everything else outside the
# layers (final norm, lm_head, score) comes after them.
_PRE = re.compile(r"emb|wte|wpe|relative_pe")
_POST = re.compile(r"embed_out")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PER_LAYER_KEYS = ("layer_types",)


def layer_count_key(config: dict) -> str | None:
    """The config key holding the number of layers (mergekit's ``num_layers_config_key``)."""
    return next((k for k in LAYER_KEYS if isinstance(config.get(k), int) and not isinstance(config[k], bool)), None)


def _split(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.w`` -> ``("model.layers.", 3, ".mlp.w")``; None outside the layers."""
    m = _LAYER.search(name)
    return (name[:m.start(1)], int(m.group(1)), name[m.end(1):]) if m else None


def _is_pre(name: str) -> bool:
    return bool(_PRE.search(name)) and not _POST.search(name)


def slices_of(recipe: Recipe) -> list[OutputSlice]:
    """The recipe's output slices (callers reach here only for a ``slices:`` recipe)."""
    assert recipe.slices is not None, "not a slices recipe"
    return recipe.slices


# ------------------------------------------------------------------------------ validation


def slice_view(recipe: Recipe, method_cls: type[MergeMethod], index: int,
               sources: list[SliceSource] | None = None) -> Recipe:
    """Slice ``index`` as a whole-model recipe over its sources (the form methods validate and
    list their entries from). Its ``parameters`` merge the slice's over the recipe's, for
    validation only: merging resolves them in order instead (``ParamScope``)."""
    sl = slices_of(recipe)[index]
    sources = sl.sources if sources is None else sources
    base = sl.base_model or recipe.base_model
    if base and method_cls.base_policy == "input" and all(s.model != base for s in sources):
        base = None  # mergekit: a base the method does not need is not added to a slice
    return recipe.model_copy(update={
        "slices": None, "base_model": base, "parameters": {**recipe.parameters, **sl.parameters},
        "models": [ModelEntry(model=s.model, parameters=s.parameters) for s in sources]})


def validate_slices(recipe: Recipe, method_cls: type[MergeMethod], source: str) -> None:
    """Every check that needs no model: per slice, what ``validate_recipe`` checks of a whole-model
    recipe, plus the base among the sources. Warnings repeated by every slice are given once."""
    if method_cls.model_statistic is not None:
        raise MergeError(f"{source}: {method_cls.name} is not available with slices (its coefficients are "
                         "whole-model statistics of fixed fine-tunes); list whole models under `models`")
    if recipe.vocab_policy != "error":
        raise MergeError(f"{source}: vocab_policy: {recipe.vocab_policy} is not supported with slices; "
                         "the models of a slices recipe must share one vocabulary")
    seen: dict[str, warnings.WarningMessage] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, sl in enumerate(slices_of(recipe)):
            where = f"{source}: slices[{i}]"
            if sl.residual_weight is not None:
                warnings.warn(f"{where}: residual_weight is read by nothing in mergekit 0.1.5; it is ignored",
                              RecipeWarning, stacklevel=2)
            view = slice_view(recipe, method_cls, i)
            if method_cls.uses_base(view) and view.base_model and all(s.model != view.base_model for s in sl.sources):
                raise MergeError(f"{where}: base model '{view.base_model}' is not one of this slice's sources; "
                                 f"{method_cls.name} reads the base's layers from the slice, so list it with a "
                                 "layer_range (mergekit refuses this too)")
            if method_cls.task_vectors and view.base_model and not method_cls.input_entries(view):
                continue  # only the base: its layers as they are (mergekit's task arithmetic), nothing to check
            method_cls.validate_recipe(view, where)
    for w in caught:
        seen.setdefault(re.sub(r"slices\[\d+\]: ", "", str(w.message)), w)
    for w in seen.values():
        warnings.warn(str(w.message), w.category, stacklevel=3)


# ------------------------------------------------------------------------------ planning


@dataclass
class _Headers:
    """One model's tensors, split into the layer stack and the rest."""

    reader: ModelReader
    ref: str
    layers: dict[int, dict[str, str]] = field(default_factory=dict)  # index -> suffix -> name
    prefix: str = ""
    other: list[str] = field(default_factory=list)
    num_layers: int = 0

    @classmethod
    def read(cls, ref: str, reader: ModelReader) -> _Headers:
        h = cls(reader, ref)
        prefixes = set()
        for name in reader.names():
            parts = _split(name)
            if parts is None:
                h.other.append(name)
                continue
            prefix, idx, suffix = parts
            prefixes.add(prefix)
            h.layers.setdefault(idx, {})[suffix] = name
        if len(prefixes) > 1:
            a, b = sorted(prefixes)[:2]
            raise MergeError(f"model '{ref}' has more than one layer stack ('{a}N', '{b}N'); slices work on "
                             "models with one (mergekit needs its `modules:` syntax for these)")
        h.prefix = prefixes.pop() if prefixes else ""
        config = reader.config()
        key = layer_count_key(config)
        h.num_layers = config[key] if key else (max(h.layers) + 1 if h.layers else 0)
        return h


@dataclass
class _Group:
    """The models one output tensor is merged from: the base, the entries and their settings."""

    base: str | None
    entries: list[ModelEntry]
    sources: dict[str, SliceSource]
    shared: tuple[dict, ...]
    chains: tuple[tuple[dict, ...], ...]


def _group(recipe: Recipe, method_cls: type[MergeMethod], index: int,
           sources: list[SliceSource] | None = None) -> _Group:
    sl: OutputSlice = slices_of(recipe)[index]
    view = slice_view(recipe, method_cls, index, sources)
    entries = method_cls.input_entries(view)
    by_ref = {s.model: s for s in (sl.sources if sources is None else sources)}
    chains = tuple((by_ref[e.model].parameters, sl.parameters, recipe.parameters) for e in entries)
    base = view.base_model if method_cls.uses_base(view) else None
    return _Group(base, entries, by_ref, (sl.parameters, recipe.parameters), chains)


class _Planner:
    def __init__(self, recipe: Recipe, method_cls: type[MergeMethod], pool: dict[str, ModelReader],
                 out_dtype: torch.dtype | None, cast_dtype: torch.dtype | None):
        self.recipe, self.method_cls = recipe, method_cls
        self.index = {ref: i for i, ref in enumerate(pool)}
        self.headers = {ref: _Headers.read(ref, r) for ref, r in pool.items()}
        self.out_dtype, self.cast_dtype = out_dtype, cast_dtype
        self.labels: list[str] = []
        self.plan = Plan(names=[], out_shapes={}, out_dtypes={})
        self.order: dict[str, str] = {}

    def add(self, out: str, group: _Group, names: dict[str, str], t: float,
            shape: tuple[int, ...] | None = None) -> None:
        """Plan output tensor ``out``, read from model ``ref`` under ``names[ref]``."""
        read = ([group.base] if group.base else []) + [e.model for e in group.entries]
        first = self.headers[read[0]].reader.tensors[names[read[0]]]
        for ref in read:
            info = self.headers[ref].reader.tensors[names[ref]]
            if not info.dtype.is_floating_point:
                raise MergeError(f"model '{ref}': tensor '{info.name}' is {info.dtype}; only floating-point "
                                 "weights can be merged")
            want = shape or first.shape
            if info.shape != want:
                raise MergeError(f"model '{ref}': tensor '{info.name}' has shape {list(info.shape)}, where "
                                 f"'{out}' needs {list(want)}; models must share one architecture")
        for e in group.entries:
            if e.model not in self.labels:
                self.labels.append(e.model)
        self.plan.sources[out] = TensorSource(
            base=(self.index[group.base], names[group.base]) if group.base else None,
            inputs=tuple((self.index[e.model], names[e.model]) for e in group.entries),
            members=tuple(self.labels.index(e.model) for e in group.entries),
            scope=ParamScope(t=t, shared=group.shared, per_entry=group.chains,
                             names=tuple(names[e.model] for e in group.entries)))
        self.plan.out_shapes[out] = tuple(shape or first.shape)
        self.plan.out_dtypes[out] = self.out_dtype or self.cast_dtype or first.dtype
        self.order[out] = max(names[ref] for ref in read)  # mergekit runs tensors in this order

    def outside(self, group: _Group, pre: bool, what: str) -> None:
        """The tensors before (``pre``) or after the layers, each under its own name in every model."""
        read = ([group.base] if group.base else []) + [e.model for e in group.entries]
        names = sorted({n for ref in read for n in self.headers[ref].other if _is_pre(n) == pre})
        for name in names:
            lacking = next((ref for ref in read if name not in self.headers[ref].reader.tensors), None)
            if lacking is not None:
                have = next(ref for ref in read if name in self.headers[ref].reader.tensors)
                raise MergeError(f"model '{lacking}': tensor '{name}' of model '{have}' is missing ({what} are "
                                 "merged from these models); models must share one architecture")
            self.add(name, group, {ref: name for ref in read}, 0.0)

    def layers(self, index: int, offset: int, template: dict[str, tuple[int, ...]], prefix: str) -> None:
        sl = slices_of(self.recipe)[index]
        group = _group(self.recipe, self.method_cls, index)
        read = ([group.base] if group.base else []) + [e.model for e in group.entries]
        where = f"slices[{index}]"
        for src in sl.sources:
            h = self.headers[src.model]
            start, end = src.layer_range
            if end > h.num_layers:
                raise MergeError(f"{where}: layer_range [{start}, {end}] is outside model '{src.model}', "
                                 f"which has {h.num_layers} layers (ranges end at {h.num_layers} at most)")
        n = sl.num_layers
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            names_by_suffix: dict[str, dict[str, str]] = {s: {} for s in template}
            for ref in read:
                h = self.headers[ref]
                layer = h.layers.get(group.sources[ref].layer_range[0] + k, {})
                if set(layer) != set(template):
                    odd = sorted(set(layer) ^ set(template))[0]
                    raise MergeError(f"model '{ref}': layer {group.sources[ref].layer_range[0] + k} does not have "
                                     f"the tensors of the output's layers (first difference: '{odd.strip('.')}'); "
                                     "models must share one architecture")
                for suffix, name in layer.items():
                    names_by_suffix[suffix][ref] = name
            for suffix in sorted(template):
                self.add(f"{prefix}{offset + k}{suffix}", group, names_by_suffix[suffix], t, template[suffix])


def plan_slices(recipe: Recipe, method_cls: type[MergeMethod], pool: dict[str, ModelReader], donor: str, *,
                out_dtype: torch.dtype | None, cast_dtype: torch.dtype | None) -> tuple[Plan, list[str]]:
    """The output of a slices recipe from headers: each tensor's sources and the output config's
    layer count. ``pool`` maps every referenced model to its reader (``TensorSource`` indices are
    positions in it); ``donor`` is the model whose config the output takes. Returns the plan and
    the merged models (every model that is an entry somewhere, in order of appearance)."""
    p = _Planner(recipe, method_cls, pool, out_dtype, cast_dtype)
    slices = slices_of(recipe)
    ref_h = p.headers[donor]
    if not ref_h.layers:
        raise MergeError(f"model '{donor}' has no layer stack (no '...layers.N.' tensors) to take slices of")
    first_layer = ref_h.layers[min(ref_h.layers)]
    template = {suffix: ref_h.reader.tensors[name].shape for suffix, name in first_layer.items()}

    p.outside(_group(recipe, method_cls, 0), True, "the tensors before the layers (embeddings)")
    offset = 0
    for i, sl in enumerate(slices):
        p.layers(i, offset, template, ref_h.prefix)
        offset += sl.num_layers
    # mergekit zips the last slice's models with the first slice's weight list: the shorter wins
    kept = slices[-1].sources[:min(len(slices[0].sources), len(slices[-1].sources))]
    post = _group(recipe, method_cls, len(slices) - 1, kept)
    if post.base is not None and post.base not in post.sources:
        raise MergeError(f"slices[{len(slices) - 1}]: the tensors after the layers (final norm, lm_head) are merged "
                         f"over this slice's first {len(kept)} source(s) (as many as the first slice has, as in "
                         f"mergekit), which leave out its base '{post.base}'; list the base first")
    p.outside(post, False, "the tensors after the layers (final norm, lm_head)")

    plan = p.plan
    plan.names = sorted(plan.sources, key=lambda n: (p.order[n], n))
    config = ref_h.reader.config()
    key = layer_count_key(config)
    if key:
        plan.config_updates[key] = offset
    for per_layer in PER_LAYER_KEYS:  # each output layer keeps the entry of the layer it came from
        ours = config.get(per_layer)
        if not isinstance(ours, list):
            continue
        values: list = []
        for sl in slices:
            src = sl.sources[0]
            theirs = p.headers[src.model].reader.config().get(per_layer)
            if not isinstance(theirs, list) or len(theirs) < src.layer_range[1]:
                values = [ours[0]] * offset if ours and all(v == ours[0] for v in ours) else ours
                break
            values += theirs[src.layer_range[0]:src.layer_range[1]]
        plan.config_updates[per_layer] = values
    return plan, p.labels
