"""The staging directory of a merge: where its shards are written, and what lets a killed merge resume.

A merge writes into ``.<OUT>.stage-<key>`` beside OUT, where ``key`` is the plan key: the recipe,
every input's identity (a pinned revision, else each file's device, inode, size and mtime), the
output layout and what else changes the bytes. Each output shard is created there at its final size
with its header in place; each merge unit writes its byte range of a shard and then, atomically, a
record ``units/<n>.json`` (range, sha256, the unit's diagnostics). A rerun of the same command finds
the directory by the same key, verifies every recorded range (size and sha256) and merges only the
rest. Another recipe or changed inputs give another key, so they never reuse it; the directory is
renamed into OUT when complete, so nothing is left beside OUT afterwards.

Records are written by the unit itself (not by the process that drives the merge), so the work of
units that finished survives whichever process is killed, on one machine or on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import current_umask
from .errors import DISK_ERRNOS, disk_error
from .io.writer import _Shard, shard_prefix

STAGE = "stage-"
READ_CHUNK = 16 << 20


@dataclass(frozen=True)
class UnitRange:
    """A merge unit's share of the output: consecutive tensors of one shard, as a byte range."""

    index: int
    file: str
    names: tuple[str, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def staging_dir(out_dir: Path, key: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{STAGE}{key[:24]}"


def record_path(stage: Path, index: int) -> Path:
    return stage / "units" / f"{index:06d}.json"


def prepare(stage: Path, shards: list[_Shard]) -> None:
    """Create the staging directory and each shard at its final size with its header, keeping
    what a previous run of the same plan left (a shard whose header differs is started again)."""
    (stage / "units").mkdir(parents=True, exist_ok=True)
    os.chmod(stage, 0o777 & ~current_umask())
    for shard in shards:
        path = stage / shard.filename
        prefix = shard_prefix(shard)
        size = len(prefix) + shard.nbytes
        if path.is_file() and path.stat().st_size == size:
            with open(path, "rb") as fh:
                if fh.read(len(prefix)) == prefix:
                    continue
        for rec in (stage / "units").glob("*.json"):  # records of the old file no longer hold
            if json.loads(rec.read_text()).get("file") == shard.filename:
                rec.unlink()
        try:
            with open(path, "wb") as fh:
                fh.write(prefix)
                fh.truncate(size)
        except OSError as exc:  # ENOSPC, EFBIG (file-size limit), EDQUOT: one line naming the file
            if exc.errno not in DISK_ERRNOS:
                raise
            raise disk_error(exc, path) from None
        os.chmod(path, 0o666 & ~current_umask())


def hash_range(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            chunk = fh.read(min(READ_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def completed(stage: Path, units: list[UnitRange]) -> dict[int, dict]:
    """The units whose records hold and whose bytes still match them (size and sha256)."""
    done: dict[int, dict] = {}
    for unit in units:
        rec_file = record_path(stage, unit.index)
        try:
            rec = json.loads(rec_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if (rec.get("file"), rec.get("start"), rec.get("end")) != (unit.file, unit.start, unit.end):
            continue
        path = stage / unit.file
        if path.is_file() and path.stat().st_size >= unit.end and hash_range(path, unit.start, unit.end) == rec["sha256"]:
            done[unit.index] = rec
        else:
            rec_file.unlink(missing_ok=True)
    return done


def write_record(stage: Path, index: int, record: dict) -> None:
    """Atomically (temporary sibling, fsync, rename): a record is whole or absent."""
    path = record_path(stage, index)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def finish(stage: Path) -> None:
    """Remove the resume bookkeeping before the directory becomes OUT."""
    for rec in (stage / "units").glob("*"):
        rec.unlink()
    (stage / "units").rmdir()
