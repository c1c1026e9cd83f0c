"""A LoRA adapter over its base, read as the full fine-tuned model it stands for.

``AdapterReader`` has ``ModelReader``'s interface (``tensors``, ``names``, ``get``, ``config``,
``label``, ``close``) and presents the base's tensor names, shapes and dtypes, so every merge
method, check and plan treats an adapter exactly like a full fine-tune, with no copy of the model on
disk. A tensor the adapter does not touch is the base's, byte for byte; a tensor it replaces
(``modules_to_save``) is the adapter's; an adapted tensor is ``base + s * B @ A``.

Precision of an adapted tensor: the update and the sum are formed in float64, and the result is
returned in float32 (float64 for a float64 base), never rounded to a narrower base dtype. A LoRA
update is small next to the weight it is added to: rounding ``base + update`` to bfloat16 (8 bits of
mantissa) would keep only the update's leading bits, so the task vector ``theta - base`` that the
merge takes would be mostly rounding error. In float32 that difference is exact to about 1e-7 of the
weight. (``tensors[name].dtype`` stays the base's: it is the dtype of the model the output copies;
the ``into`` buffer, sized for it, receives the base tensor.)

Also: ``delta(name)`` (the float64 update) and ``factor_sqnorm(name)`` (its squared norm from the
factors) for callers that can use the update directly.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .. import lora
from ..errors import MergeError
from .reader import ModelReader, TensorInfo


class AdapterReader(ModelReader):
    """The full model ``base + adapter``, one tensor at a time. A ``ModelReader`` by interface (it
    replaces every public method; nothing of the folder reader's own state is used)."""

    def __init__(self, base_path: str | Path, adapter_path: str | Path, label: str, *,
                 base_ref: str | None = None, allow_pickle: bool = False):
        self.path = Path(adapter_path)
        self.base_path = Path(base_path)
        self.label = label
        self.allow_pickle = allow_pickle
        self.base = ModelReader(base_path, f"{label} (its base {base_ref or base_path})", allow_pickle=allow_pickle)
        self.weights = ModelReader(adapter_path, label, allow_pickle=allow_pickle)
        self.spec = lora.parse_adapter(lora.read_config(self.path, label), self.weights.tensors,
                                       self.base.tensors, label)
        self.tensors: dict[str, TensorInfo] = dict(self.base.tensors)
        for name, key in self.spec.full.items():  # a replaced tensor lives in the adapter's file
            self.tensors[name] = replace(self.tensors[name], file=self.weights.tensors[key].file)
        named = self.spec.base_model_name
        if named and base_ref and not _same_model(named, base_ref, self.base_path):
            warnings.warn(f"{label}: adapter_config.json says it was trained on '{named}', but it is applied to "
                          f"'{base_ref}'; check that they are the same model", stacklevel=2)

    def names(self) -> list[str]:
        return list(self.tensors)

    def is_lora_update(self, name: str) -> bool:
        """Whether ``name`` is exactly ``base + s * B @ A`` (a LoRA factor pair and no replacement)."""
        return name in self.spec.factors and name not in self.spec.full

    def delta(self, name: str) -> torch.Tensor:
        """The LoRA update of ``name`` in float64 (zeros are not made for untouched tensors)."""
        return lora.delta(self.weights, self.spec.factors[name])

    def factor_sqnorm(self, name: str) -> float:
        f = self.spec.factors[name]
        b, a = lora.load_factors(self.weights, f)
        return lora.factor_sqnorm(b, a, f.scale)

    def get(self, name: str, into: bytearray | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise MergeError(f"{self.label}: tensor '{name}' is missing")
        replaced = self.spec.full.get(name)
        t = self.weights.get(replaced) if replaced else self.base.get(name, into=into)
        f = self.spec.factors.get(name)
        if f is None:
            return t
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.to(torch.float64).add_(self.delta(name)).to(wide)

    def config(self) -> dict:
        return self.base.config()

    def close(self) -> None:
        self.base.close()
        self.weights.close()


def _same_model(named: str, base_ref: str, base_path: Path) -> bool:
    """Whether the adapter's ``base_model_name_or_path`` names the base it is applied to: the same
    reference, the same folder, or a hub id the reference (or its folder) ends with."""
    ref = base_ref.partition("@")[0].rstrip("/")
    named = named.rstrip("/")
    if named == ref:
        return True
    p = Path(named).expanduser()
    if p.exists():
        return p.resolve() == base_path.resolve()
    return ref.endswith("/" + named) or str(base_path).endswith("/" + named) or \
        base_path.parent.parent.name.endswith("--" + named.replace("/", "--"))
