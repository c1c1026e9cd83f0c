"""How a method's parameters are declared, checked and resolved for one tensor.

mergekit recipes give a parameter as a scalar, as a list of numbers interpolated over the layers
(a "gradient"), or as a list of ``{filter, value}`` conditions matched against the tensor name.
Every method reads its parameters through ``Param`` and ``evaluate_setting``, so every form works
wherever a parameter is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

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
    index = layer_index(tensor_name)
    if index is None or not num_layers:
        return 0.0
    return 1.0 if num_layers < 2 else index / (num_layers - 1)


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


def leaves(value: Any) -> list[Any]:
    """Every concrete value a (possibly list-shaped) parameter setting can produce."""
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
