"""Lazy access to a model's tensors, one at a time, from single-file or sharded safetensors.

Only the headers are read up front (names, shapes, dtypes), so the whole input can be checked
before the first tensor is loaded. Pickle checkpoints (``.bin``/``.pt``) can run code when loaded
and are refused unless the caller opts in.

Why not ``safetensors.safe_open``: this reader is lighter where the merge needs it. It reads each
tensor's bytes with one ``readinto`` into a caller's reusable buffer (``loading.Workspace``), so a
merge allocates the largest tensor once instead of a new tensor per read; it checks an untrusted
header's byte ranges (overlaps, holes, past the end) and its shard index (plain names inside the
folder) with one-line errors naming the file and the fix; and it needs no mmap of whole shards.
The writer (``writer.py``) is hand-written for the same reason: shard headers are planned up
front so tensors stream to disk as they are merged, which ``safetensors.torch.save_file`` (one
dict of tensors in memory per file) cannot do.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from io import FileIO
from pathlib import Path

import torch

from ..errors import MergeError
from ..shapes import nbytes, numel
from .untrusted import checked_file, own_file

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int = 0  # absolute byte offset of the data in the file (safetensors only)

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def _read_header(path: Path, label: str) -> tuple[dict, int]:
    """Parse a safetensors header, check every tensor's bytes are inside the file; return it and
    the offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{label}: {path.name} is not a valid safetensors file ({exc}); "
                         "re-download or re-save the model") from None
    if not isinstance(header, dict):
        raise MergeError(f"{label}: {path.name} is not a valid safetensors file (the header is not a JSON "
                         "object); re-download or re-save the model")
    data_len = size - 8 - n
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not _valid_entry(meta):
            raise MergeError(f"{label}: {path.name} is not a valid safetensors file (bad header entry for "
                             f"tensor '{name}'); re-download or re-save the model")
        start, end = meta["data_offsets"]
        if end > data_len:
            raise MergeError(f"{label}: {path.name} is truncated (tensor '{name}' ends past the end "
                             "of the file); re-download or re-save the model")
        if meta["dtype"] not in ST_DTYPES:
            raise MergeError(f"{label}: {path.name}: tensor '{name}' has unsupported dtype {meta['dtype']}")
        if end - start != nbytes(meta["shape"], ST_DTYPES[meta["dtype"]]):
            raise MergeError(f"{label}: {path.name} is not a valid safetensors file (tensor '{name}' spans "
                             f"{end - start} bytes, not the size of its shape and dtype); re-download or re-save the model")
        spans.append((start, end, name))
    # safetensors' own rule: the byte ranges, in offset order, follow each other from 0 with no
    # overlap and no hole, so no byte is read as two tensors (or as none)
    at, prev = 0, None
    for start, end, name in sorted(spans):
        if start != at:
            why = f"overlaps '{prev}'" if start < at else f"leaves a hole after '{prev}'" if prev else "does not start at 0"
            raise MergeError(f"{label}: {path.name} is not a valid safetensors file (the bytes of tensor '{name}' "
                             f"{why}); re-download or re-save the model")
        at, prev = end, name
    return header, 8 + n


def _valid_entry(meta) -> bool:
    """A header entry has a dtype, a shape of non-negative ints and two ordered data offsets."""
    if not isinstance(meta, dict):
        return False
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    return (isinstance(meta.get("dtype"), str) and _counts(shape) and _counts(offsets)
            and len(offsets) == 2 and offsets[0] <= offsets[1])  # type: ignore[arg-type,index]


def _counts(xs) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


class ModelReader:
    """Names, shapes and lazily loaded tensors of one model directory."""

    def __init__(self, path: str | Path, label: str | None = None, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.label = label or str(path)
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[str, FileIO] = {}
        self._pickled: dict[str, dict] = {}
        self._index()

    # -- discovery -------------------------------------------------------------------------
    def _index(self) -> None:
        index = self.path / "model.safetensors.index.json"
        files = sorted(self.path.glob("*.safetensors"))
        if index.exists():
            try:
                data = json.loads(checked_file(self.path, index.name, self.label, "the folder").read_text())
                weight_map = data["weight_map"] if isinstance(data, dict) else None
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("weight_map must map tensor names to shard file names")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                reason = "no weight_map" if isinstance(exc, KeyError) else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise MergeError(f"{self.label}: {index.name} is not a valid index ({reason}); "
                                 "re-download the model") from None
            files = [checked_file(self.path, s, self.label, index.name, "shard") for s in sorted(set(weight_map.values()))]
        else:
            files = [checked_file(self.path, f.name, self.label, "the folder") for f in files]
        if not files:
            self._index_pickle()
            return
        for f in files:
            header, data_start = _read_header(f, self.label)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                self.tensors[name] = TensorInfo(name, tuple(meta["shape"]), ST_DTYPES[meta["dtype"]], f.name,
                                                data_start + meta["data_offsets"][0])

    def _index_pickle(self) -> None:
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES and own_file(self.path, p))
        if not pickles:
            raise MergeError(f"{self.label}: no *.safetensors weights in {self.path}")
        if not self.allow_pickle:
            raise MergeError(f"{self.label}: only pickle weights ({pickles[0].name}) found; pickle can run "
                             "code when loaded: convert to safetensors, or pass --allow-pickle if you trust it")
        for p in pickles:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any failure is a bad file for the user
                raise MergeError(f"{self.label}: cannot load {p.name} ({type(exc).__name__}: {exc})") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise MergeError(f"{self.label}: {p.name} is not a flat state dict of tensors (a training "
                                 "checkpoint?); save the model with save_pretrained, or convert it to safetensors")
            self._pickled[p.name] = state
            for name, t in state.items():
                self.tensors[name] = TensorInfo(name, tuple(t.shape), t.dtype, p.name)

    # -- access ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, into: bytearray | None = None) -> torch.Tensor:
        """Load one tensor in its stored dtype.

        Plain positioned reads rather than memory maps: pages of a map stay resident (and count
        as this process's memory) until the file is closed, which over a whole model is the
        model's size. ``into`` is a reusable byte buffer (at least the tensor's size); the tensor
        returned is then a view of it, valid until the buffer is reused.
        """
        info = self.tensors.get(name)
        if info is None:
            raise MergeError(f"{self.label}: tensor '{name}' is missing")
        if info.file in self._pickled:
            return self._pickled[info.file][name]
        fh = self._handle(info.file)
        buf = into if into is not None else bytearray(info.nbytes)
        fh.seek(info.offset)
        got = fh.readinto(memoryview(buf)[:info.nbytes])
        if got != info.nbytes:
            raise MergeError(f"{self.label}: {info.file}: tensor '{name}' is truncated; re-download or re-save it")
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype, count=info.numel).reshape(info.shape)

    def _handle(self, file: str):
        """The open file ``file`` of the folder, opened once and kept for every later read."""
        fh = self._handles.get(file)
        if fh is None:
            try:
                fh = open(self.path / file, "rb", buffering=0)
            except OSError as exc:
                raise MergeError(f"{self.label}: cannot open {file} ({exc.strerror}); re-download it") from None
            self._handles[file] = fh
        return fh

    def get_flat(self, name: str, start: int, count: int, into: bytearray | None = None) -> torch.Tensor:
        """Entries ``[start, start + count)`` of the flattened tensor, in its stored dtype: one
        positioned read of just those bytes (a large tensor merged a chunk at a time)."""
        info = self.tensors.get(name)
        if info is None:
            raise MergeError(f"{self.label}: tensor '{name}' is missing")
        if info.file in self._pickled:
            return self._pickled[info.file][name].reshape(-1)[start:start + count]
        fh = self._handle(info.file)
        size = info.dtype.itemsize
        nbytes = count * size
        buf = into if into is not None else bytearray(nbytes)
        fh.seek(info.offset + start * size)
        got = fh.readinto(memoryview(buf)[:nbytes])
        if got != nbytes:
            raise MergeError(f"{self.label}: {info.file}: tensor '{name}' is truncated; re-download or re-save it")
        return torch.frombuffer(buf, dtype=info.dtype, count=count) if count else torch.empty(0, dtype=info.dtype)

    def config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        checked_file(self.path, cfg.name, self.label, "the folder")
        try:
            return json.loads(cfg.read_text())
        except ValueError as exc:
            raise MergeError(f"{self.label}: config.json is not valid JSON ({exc})") from None

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self._pickled.clear()
