"""Load tensors for computation into reusable buffers, and name the input behind a NaN/Inf.

Converting a tensor into freshly allocated memory costs page faults on every page, which here
is most of the merge's time; converting into a buffer that is reused from tensor to tensor is
several times faster. A ``Workspace`` keeps one growing buffer per slot (the base, each model),
so memory stays bounded by a few of the largest tensors and is touched once.
"""

from __future__ import annotations

import torch

from . import shapes
from .errors import MergeError
from .io import ModelReader
from .io.adapter import AdapterReader
from .refs import ResolvedModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def open_reader(model: ResolvedModel, label: str, *, allow_pickle: bool = False) -> ModelReader:
    """The one way an input model is opened for reading: the engine, the statistic pass and every
    worker of a scaled-out merge call this with the pinned model (a small, picklable value), so an
    input kind added here works in all of them. A LoRA adapter is read over its base as the full
    model it stands for (``io/adapter.py``)."""
    if model.adapter:
        if model.base_path is None:
            raise MergeError(f"{label} is a LoRA adapter with no base to apply it to; set base_model in the "
                             "recipe or write it as BASE+ADAPTER")
        return AdapterReader(model.base_path, model.path, label, base_ref=model.base_ref,
                             allow_pickle=allow_pickle)
    return ModelReader(model.path, label, allow_pickle=allow_pickle)


def compute_dtype(cast_dtype: torch.dtype | None) -> torch.dtype:
    """Arithmetic runs in float32 at least, float64 when the recipe asks for it."""
    return torch.float64 if cast_dtype == torch.float64 else torch.float32


class Workspace:
    """Reusable buffers, one per slot name, grown to the largest tensor seen."""

    def __init__(self, device: torch.device):
        self.device = device
        self._compute: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._raw: dict[str, bytearray] = {}

    def buffer(self, slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = shapes.numel(shape)
        key = (slot, dtype)
        buf = self._compute.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._compute[key] = buf
        return buf[:numel].view(shape)

    def raw(self, slot: str, nbytes: int) -> bytearray:
        buf = self._raw.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = bytearray(nbytes)
            self._raw[slot] = buf
        return buf


def load_compute(reader: ModelReader, name: str, device: torch.device, cast_dtype: torch.dtype | None,
                 rows: int | None = None, *, workspace: Workspace | None = None,
                 slot: str = "") -> torch.Tensor:
    """The tensor in the compute dtype on ``device``: a view of ``workspace``'s buffer ``slot``
    (valid until that slot is loaded again), or fresh memory without a workspace.

    ``cast_dtype`` (the recipe's ``dtype``) rounds the stored values first, as mergekit does when it
    loads; ``rows`` keeps only the first rows (shared vocabulary). No NaN/Inf check here: callers
    check a reduction they compute anyway and call ``name_nonfinite`` when it is not finite.
    """
    raw = workspace.raw(slot, reader.tensors[name].nbytes) if workspace is not None else None
    t = reader.get(name, into=raw)
    if rows is not None:
        t = t[:rows]
    dtype = compute_dtype(cast_dtype)
    if cast_dtype is not None and t.dtype != cast_dtype and cast_dtype != dtype:
        t = t.to(cast_dtype)  # round to a narrower dtype first; a cast to the compute dtype is the copy below
    if workspace is None:
        return t.to(device=device, dtype=dtype, copy=True)
    out = workspace.buffer(slot, tuple(t.shape), dtype)
    out.copy_(t)
    return out


def load_compute_flat(reader: ModelReader, name: str, start: int, count: int, device: torch.device,
                      cast_dtype: torch.dtype | None, *, workspace: Workspace, slot: str) -> torch.Tensor:
    """Entries ``[start, start + count)`` of the flattened tensor, as :func:`load_compute` loads a
    whole one (rounded to ``cast_dtype`` first, then in the compute dtype, in ``slot``'s buffer)."""
    size = reader.tensors[name].dtype.itemsize
    t = reader.get_flat(name, start, count, into=workspace.raw(slot, count * size))
    dtype = compute_dtype(cast_dtype)
    if cast_dtype is not None and t.dtype != cast_dtype and cast_dtype != dtype:
        t = t.to(cast_dtype)
    out = workspace.buffer(slot, (count,), dtype)
    out.copy_(t)
    return out


def name_nonfinite(readers: list[ModelReader], name: str, what: str = "merged tensor",
                   names: list[str] | None = None) -> MergeError:
    """The one-line error for a non-finite result: which input holds the NaN/Inf, if any.
    ``names``: the tensor each reader holds it under, when not ``name`` (slices)."""
    for reader, held in zip(readers, names or [name] * len(readers)):
        t = reader.get(held).float()
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            return MergeError(f"{reader.label}: tensor '{held}' in {reader.tensors[held].file} contains {bad}; "
                              "the checkpoint is damaged: re-download or re-train it")
    return MergeError(f"{what} '{name}' overflowed to Inf/NaN in the compute dtype; merge with dtype: float64 "
                      "or check the weights")
