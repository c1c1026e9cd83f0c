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
from .io.direct import read_range
from .io.writer import _Shard, shard_prefix

STAGE = "stage-"


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
                fh.flush()
                _allocate(fh.fileno(), size)
        except OSError as exc:  # ENOSPC, EFBIG (file-size limit), EDQUOT: one line naming the file
            if exc.errno not in DISK_ERRNOS:
                raise
            raise disk_error(exc, path) from None
        os.chmod(path, 0o666 & ~current_umask())


def _allocate(fd: int, size: int) -> None:
    """Give the shard its blocks now (``posix_fallocate``), else a sparse file of that size.

    A full disk then fails here, before any tensor is merged, and the units' direct writes
    (:mod:`metamerge.io.direct`) land in extents that already exist instead of allocating blocks
    as they go, from several processes at once. (Measured here, direct writes ran as fast into a
    sparse file as into an allocated one: this is for the early failure, not for speed.)"""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: a sparse file does as well


def hash_range(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    read_range(path, start, end, h.update)
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
    """Atomically (temporary sibling, rename): a record is whole or absent to every reader. Not
    synced: after a power cut a record may be lost (the unit is merged again) or outlive its data
    (its range no longer matches its sha256 and the unit is merged again)."""
    path = record_path(stage, index)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


def finish(stage: Path) -> None:
    """Remove the resume bookkeeping before the directory becomes OUT."""
    for rec in (stage / "units").glob("*"):
        rec.unlink()
    (stage / "units").rmdir()


class ShardHasher:
    """The sha256 of every staged shard, computed on a thread while the merge runs: as soon as a
    shard's bytes are complete from its start up to some point (its header, then units finishing
    in any order), that prefix is hashed, so the finalize step waits for little more than the last
    unit's range rather than reading every shard again."""

    def __init__(self, stage: Path, shards: list[_Shard]):
        import threading

        self._stage = stage
        self._next = {s.filename: 0 for s in shards}          # hashed up to here
        self._size = {s.filename: len(shard_prefix(s)) + s.nbytes for s in shards}
        self._first = {s.filename: len(shard_prefix(s)) for s in shards}  # the header is written at once
        self._ready: dict[str, dict[int, int]] = {s.filename: {0: self._first[s.filename]} for s in shards}
        self._hash = {s.filename: hashlib.sha256() for s in shards}
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-hash", daemon=True)
        self._thread.start()

    def done(self, unit: UnitRange) -> None:
        """``unit``'s range of its shard is final."""
        with self._cond:
            self._ready[unit.file][unit.start] = unit.end
            self._cond.notify()

    def _take(self) -> tuple[str, int, int] | None:
        for file, pos in self._next.items():
            end = self._ready[file].get(pos)
            if end is not None:
                return file, pos, end
        return None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    job = self._take()
                    while job is None and not self._closed:
                        self._cond.wait()
                        job = self._take()
                    if job is None:
                        return
                    file, lo, hi = job
                    del self._ready[file][lo]
                # around the page cache, like the units' writes: no fresh page of memory per byte
                read_range(self._stage / file, lo, hi, self._hash[file].update)
                with self._cond:
                    self._next[file] = hi
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self._error = exc

    def result(self) -> dict[str, str]:
        """Every shard's sha256, once every unit was reported ``done``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        short = [f for f, pos in self._next.items() if pos != self._size[f]]
        if short:
            raise RuntimeError(f"shard hashes incomplete: {short}")
        return {f: h.hexdigest() for f, h in self._hash.items()}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._ready = {f: {} for f in self._ready}
            self._cond.notify()
        self._thread.join()
