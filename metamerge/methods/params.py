"""How a method's parameters are declared, checked and resolved for one tensor.

mergekit recipes give a parameter as a scalar, as a list of numbers interpolated over the layers
(a "gradient"), or as a list of ``{filter, value}`` conditions matched against the tensor name.
Every method reads its parameters through ``Param`` and ``evaluate_setting``, so every form works
wherever a parameter is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import MergeError
from ..layers import layer_index

REQUIRED = object()


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
            value = self.lax(value)
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

    def lax(self, value: Any) -> Any:
        """mergekit (pydantic) reads a numeric string as a number for a numeric parameter: YAML
        loads ``1e-3`` (no dot) as a string, so ``epsilon: 1e-3`` must still be 0.001."""
        if self.kind is float and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                return value
        return value


@dataclass(frozen=True)
class ParamScope:
    """Where one tensor's parameters come from when the tensor is not read under its own name
    from every model (a slices recipe): mergekit's ``ConfigReader`` for one output tensor.

    ``shared``: the settings global parameters are read from, highest precedence first (the
    slice's ``parameters``, then the recipe's). ``per_entry``: for each merged model, its settings
    (the source's ``parameters``, the slice's, the recipe's) and, in ``names``, the tensor name it
    is read under, which is what a ``filter`` is matched against for that model's parameters.
    ``t``: the gradient position (mergekit: a layer's index in its slice over the slice's length
    minus one, 1 for a one-layer slice, 0 outside the layers).
    """

    t: float
    shared: tuple[dict, ...]
    per_entry: tuple[tuple[dict, ...], ...]
    names: tuple[str, ...]


def layer_fraction(tensor_name: str, num_layers: int | None) -> float:
    """Where a tensor sits in the depth of the model, 0..1, for mergekit's gradient parameters.

    Layer i of N maps to i/(N-1) (1 for a single layer); tensors outside the layer stack
    (embeddings, final norm, lm_head) map to 0, as in mergekit's plan for whole-model recipes.
    """
    index = layer_index(tensor_name)
    if index is None or not num_layers:
        return 0.0
    return 1.0 if num_layers < 2 else index / (num_layers - 1)


def evaluate_setting(value: Any, tensor_name: str, t: float, convert: Callable[[Any], Any] | None = None) -> Any:
    """A parameter value for one tensor: a scalar, a gradient list, or one or a list of {filter, value}.

    Mirrors mergekit's ``evaluate_setting``: a list of numbers is interpolated linearly at ``t``
    (a list of other scalars picks the entry at ``int(t * (n - 1))``); a list of mappings picks the
    first whose ``filter`` is a substring of the tensor name (no filter, or ``*``, matches all);
    None when nothing matches (the caller falls through to the next setting). ``convert`` is the
    parameter's own reading of one scalar (numeric strings of a numeric parameter), applied to a
    list's entries before deciding whether they interpolate, as mergekit validates them first.
    """
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if convert is not None and not any(isinstance(v, dict) for v in value):
        value = [convert(v) for v in value]
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
            return evaluate_setting(cond.get("value"), tensor_name, t, convert)
    return None


def leaves(value: Any) -> list[Any]:
    """Every concrete value a (possibly list-shaped) parameter setting can produce."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [value]
    out: list[Any] = []
    for v in value:
        if isinstance(v, dict):
            extra = set(v) - {"filter", "value"}
            if extra or "value" not in v:
                raise MergeError(f"a conditional parameter needs keys 'filter' and 'value', got {sorted(v)}")
            out.extend(leaves(v["value"]))
        else:
            out.append(v)
    return out
