"""The merge recipe: mergekit's YAML format, validated before any tensor is read.

A recipe users already run with ``mergekit-yaml`` is accepted unchanged for the methods both tools
share, in either of mergekit's forms: ``models`` (whole models merged tensor by tensor) or
``slices`` (the output's layers stacked from layer ranges of the inputs, see ``slices.py``). Keys
mergekit has but metamerge does not implement (``tokenizer``, ``chat_template``, ``modules``) are
refused by name rather than silently ignored; anything else unknown is a typo and refused too.
``vocab_policy`` is metamerge's own addition.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError
from .validation import first_error, read_yaml

DTYPES = ("float32", "float16", "bfloat16", "float64")
UNSUPPORTED_KEYS = {
    "merge_method": "a per-slice merge_method is not in mergekit 0.1.5 (it would ignore it); "
                    "use the one top-level merge_method",
    "modules": "per-module configurations are not supported; use one recipe per merge",
    "tokenizer": "the `tokenizer:` block is not supported; use `tokenizer_source: base` or a model",
    "chat_template": "`chat_template` is not supported; the tokenizer_source's template is kept",
}

# A parameter value: a number (or bool), a gradient list, or mergekit's {filter, value} (one or a list).
ParamValue = float | int | bool | str | list | dict


def _model_ref(v: str) -> str:
    # ``BASE+ADAPTER`` (a LoRA adapter over a base, mergekit's syntax) is resolved in refs.py
    if not v.strip():
        raise ValueError("empty model reference")
    return v.strip()


def _no_params(v: Any) -> Any:
    return {} if v is None else v  # mergekit accepts `parameters:` left empty


class ModelEntry(BaseModel):
    """One entry under ``models``: a reference and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _ref = field_validator("model")(_model_ref)


class SliceSource(BaseModel):
    """One source of an output slice: layers ``layer_range`` = [start, end) of ``model``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _ref = field_validator("model")(_model_ref)
    _params = field_validator("parameters", mode="before")(_no_params)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        start, end = v
        if start < 0 or end < start:
            # mergekit reads layer -1 (a missing tensor) or writes a config with fewer layers than tensors
            raise ValueError(f"[{start}, {end}] is not a range of layers: need 0 <= start <= end (end excluded)")
        return v

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(BaseModel):
    """One slice of the output's layers: the same number of layers from each source, merged."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None       # this slice's base (mergekit: overrides the recipe's)
    residual_weight: float | None = None  # in mergekit 0.1.5's schema, read by nothing
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _params = field_validator("parameters", mode="before")(_no_params)

    @field_validator("sources")
    @classmethod
    def _same_lengths(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        lengths = [s.length for s in v]
        if any(n != lengths[0] for n in lengths):
            raise ValueError(f"sources cover different numbers of layers ({', '.join(map(str, lengths))}); "
                             "every source of a slice gives the same number of layers")
        return v

    @property
    def num_layers(self) -> int:
        return self.sources[0].length


class Recipe(BaseModel):
    """A validated merge recipe (see README, "Recipes")."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    tokenizer_source: str | None = None
    vocab_policy: Literal["error", "truncate", "extend"] = "error"
    name: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Recipe:
        if self.slices is not None and not self.slices:
            self.slices = None  # mergekit reads `slices: []` as absent
        self._one_revision_per_model()
        return self

    def _one_revision_per_model(self) -> None:
        """The same model at two revisions is two different inputs under one name: every cache key,
        report row and provenance entry is per name, so it is refused (pin one revision)."""
        refs = self.referenced_models()
        if self.tokenizer_source not in (None, "base", "union"):
            refs.append(self.tokenizer_source)
        seen: dict[str, str] = {}
        for ref in refs:
            name, _, rev = ref.partition("@")
            if name in seen and seen[name] != ref:
                raise ValueError(f"model '{name}' appears at two revisions ('{seen[name]}' and '{ref}'); "
                                 "a recipe reads each model at one revision: use the same @revision everywhere")
            seen.setdefault(name, ref)

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, once each, base first, in order of appearance."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        for s in self.slices or []:
            refs += [s.base_model] if s.base_model else []
            refs += [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    def fine_tunes(self) -> list[ModelEntry]:
        """The models that contribute task vectors: every entry except a parameter-less base.

        mergekit recipes often list the base again under ``models`` without parameters; mergekit
        skips it, and so does this.
        """
        return [m for m in self.models if not (m.model == self.base_model and not m.parameters)]

    def entry(self, ref: str) -> ModelEntry:
        """The entry listing ``ref`` under ``models``, or a parameter-less one (an unlisted base)."""
        return next((m for m in self.models if m.model == ref), None) or ModelEntry(model=ref)

    def sha256(self) -> str:
        """A content hash of the validated recipe, independent of YAML formatting: mapping keys
        in any order, and a number written ``1`` or ``1.0``, hash the same."""
        text = json.dumps(_canonical(self.model_dump(exclude_none=True)), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True, exclude_defaults=True), sort_keys=False)


def _canonical(value: Any) -> Any:
    """Numbers as floats (bools stay bools), recursively; key order is left to ``sort_keys``."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict; every problem is a one-line ``MergeError``."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: a recipe must be a YAML mapping with merge_method, base_model and models")
    # mergekit: exactly one of `models` or `slices` (an empty list counts as absent)
    if data.get("models") and data.get("slices"):
        raise InputError(f"{source}: give either 'models' (whole models) or 'slices' (layer ranges), not both")
    if "models" not in data and not data.get("slices"):
        raise InputError(f"{source}: missing required key 'models' (or 'slices' for layer ranges)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc, source, "recipe", hints=UNSUPPORTED_KEYS) from None
    from .methods import get_method  # late import: methods import this module's types

    method_cls = get_method(recipe.merge_method, source)
    if recipe.slices:
        from .slices import validate_slices

        validate_slices(recipe, method_cls, source)
    else:
        method_cls.validate_recipe(recipe, source)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    data = read_yaml(path, "recipe")
    return parse_recipe(data, str(path))
