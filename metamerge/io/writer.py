"""Write a merged model as sharded safetensors while the merge runs.

Every output tensor's name, shape and dtype is known before the merge starts, so each shard's
header is written first and tensor bytes are streamed after it: memory holds one tensor, never a
shard. Shards are named and indexed as ``save_pretrained`` names them, so transformers loads the
result directly. File hashes are computed on the bytes as they are written (no second read).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import DISK_ERRNOS, MergeError, disk_error
from ..shapes import nbytes

ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def _hub_parser():
    """``huggingface_hub``'s own parser of decimal sizes (``"5GB"``, ``"0.5 MB"``: the one behind
    transformers' ``save_pretrained(max_shard_size=...)``), or None where the installed version has
    none. It knows no binary units (``MiB``), bare numbers or unit letters without ``B``, which
    recipes and the CLI accept, so those stay parsed here."""
    try:
        from huggingface_hub.serialization._base import parse_size_to_int
    except ImportError:  # an older or newer huggingface_hub: the regular expression alone
        return None
    return parse_size_to_int


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500*2**20, or an int as is. Decimal ``[KMGT]B`` sizes go
    through ``huggingface_hub`` (:func:`_hub_parser`) so they mean what they mean to transformers."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise MergeError(f"bad size '{text}': use e.g. 2GB, 500MB or a number of bytes")
    value, unit, b = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").upper()
    hub = _hub_parser()
    if hub is not None and unit and b == "B":
        return int(hub(f"{m.group(1)}{unit}B"))
    base = 1024 if b == "IB" else 1000
    return int(value * base ** " KMGT".index(unit or " "))


@dataclass
class _Shard:
    filename: str
    names: list[str] = field(default_factory=list)
    header: dict = field(default_factory=dict)
    nbytes: int = 0


def shard_prefix(shard: _Shard) -> bytes:
    """The 8-byte header length and the JSON header of ``shard``: every byte before its data."""
    header = dict(shard.header)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def shard_layout(plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[_Shard]:
    """The output shards of ``plan`` (names, header, file names), as :class:`ShardedWriter` writes
    them: the scaled-out merge writes each shard's byte ranges from several processes."""
    return ShardedWriter._plan(plan, max_shard_size)


def index_text(shards: list[_Shard]) -> str | None:
    """``model.safetensors.index.json`` of a sharded output (None for a single file)."""
    if len(shards) < 2:
        return None
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {n: s.filename for s in shards for n in s.names},
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


class ShardedWriter:
    """Write tensors, in the planned order, into shards of at most ``max_shard_size`` bytes."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int = 5_000_000_000):
        self.out_dir = Path(out_dir)
        self.order = [name for name, _, _ in plan]
        self.expected = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        self.shards = self._plan(plan, max_shard_size)
        self.hashes: dict[str, str] = {}
        self._next = 0
        self._fh: BinaryIO | None = None
        self._hash: Any = None  # a hashlib sha256 object while a shard is open
        self._shard_of = {n: s for s in self.shards for n in s.names}

    @staticmethod
    def _plan(plan, max_shard_size: int) -> list[_Shard]:
        shards: list[_Shard] = [_Shard("")]
        for name, shape, dtype in plan:
            size = nbytes(shape, dtype)
            cur = shards[-1]
            if cur.names and cur.nbytes + size > max_shard_size:
                cur = _Shard("")
                shards.append(cur)
            cur.header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [cur.nbytes, cur.nbytes + size]}
            cur.names.append(name)
            cur.nbytes += size
        n = len(shards)
        for i, s in enumerate(shards, 1):
            s.filename = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        return shards

    def _open(self, shard: _Shard) -> None:
        self._finish_file()
        self._fh = open(self.out_dir / shard.filename, "wb")
        self._hash = hashlib.sha256()
        self._current = shard
        self._emit(shard_prefix(shard))

    def _emit(self, data) -> None:
        try:
            assert self._fh is not None
            self._fh.write(data)
        except OSError as exc:  # ENOSPC, EFBIG (file-size limit), EDQUOT: one line naming the file
            if exc.errno not in DISK_ERRNOS:
                raise
            raise disk_error(exc, self.out_dir / self._current.filename) from None
        self._hash.update(data)

    def _finish_file(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()  # flushes the buffer: the last write can fail here
            except OSError as exc:
                self._fh = None
                if exc.errno not in DISK_ERRNOS:
                    raise
                raise disk_error(exc, self.out_dir / self._current.filename) from None
            self.hashes[self._current.filename] = self._hash.hexdigest()
            self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; order, shape and dtype must match the plan."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            want = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"writer expected tensor '{want}', got '{name}'")
        shape, dtype = self.expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer: '{name}' is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        shard = self._shard_of[name]
        if self._fh is None or self._current is not shard:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        self._next += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index for sharded output; return file -> sha256."""
        if self._next != len(self.order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self.order)} tensors")
        self._finish_file()
        if (text := index_text(self.shards)) is not None:
            (self.out_dir / "model.safetensors.index.json").write_text(text)
            self.hashes["model.safetensors.index.json"] = hashlib.sha256(text.encode()).hexdigest()
        return self.hashes

    def abort(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()  # the staging is removed anyway; a failed flush here is not news
            except OSError:
                pass
            self._fh = None
