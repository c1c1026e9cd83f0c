"""The merge recipe: mergekit's YAML format, validated before any tensor is read.

A recipe users already run with ``mergekit-yaml`` is accepted unchanged for the methods both tools
share. Keys mergekit has but metamerge does not implement (``slices``, ``tokenizer``,
``chat_template``, ``modules``) are refused by name rather than silently ignored; anything else
unknown is a typo and refused too. ``vocab_policy`` is metamerge's own addition.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError
from .validation import first_error, read_yaml

DTYPES = ("float32", "float16", "bfloat16", "float64")
UNSUPPORTED_KEYS = {
    "slices": "layer slicing (frankenmerges) is not supported; list whole models under `models`",
    "modules": "per-module configurations are not supported; use one recipe per merge",
    "tokenizer": "the `tokenizer:` block is not supported; use `tokenizer_source: base` or a model",
    "chat_template": "`chat_template` is not supported; the tokenizer_source's template is kept",
}

# A parameter value: a number (or bool), or mergekit's list of {filter, value} / gradient list.
ParamValue = Union[float, int, bool, str, list]


class ModelEntry(BaseModel):
    """One entry under ``models``: a reference and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _no_lora(cls, v: str) -> str:
        if "+" in v:
            raise ValueError(f"'{v}': LoRA references (model+lora) are not supported; merge the adapter first")
        if not v.strip():
            raise ValueError("empty model reference")
        return v.strip()


class Recipe(BaseModel):
    """A validated merge recipe (see README, "Recipes")."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    tokenizer_source: str | None = None
    vocab_policy: Literal["error", "truncate", "extend"] = "error"
    name: str | None = None

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
        return yaml.safe_dump(self.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False)


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
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc, source, "recipe", hints=UNSUPPORTED_KEYS) from None
    from .methods import get_method  # late import: methods import this module's types

    method_cls = get_method(recipe.merge_method, source)
    method_cls.validate_recipe(recipe, source)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    data = read_yaml(path, "recipe")
    return parse_recipe(data, str(path))
