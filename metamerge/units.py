"""The units of a merge: small picklable descriptions in, small results out, never a tensor.

A unit names what it works on (paths, tensor names, byte ranges) and carries the merge's
:class:`MergeSpec` (the recipe and the pinned inputs), from which any process, on this machine or a
Dask worker elsewhere, reopens the inputs (headers only) and does its share:

- a **norm unit** (:func:`run_norm_unit`): a group of tensors for the fine-tunes whose statistic is
  needed -> per-tensor statistics (MetaGPT's squared norms, float64 sums);
- a **merge unit** (:func:`run_merge_unit`): consecutive tensors of one output shard -> their bytes
  written into the shard in the staging directory, and a record with the range's sha256 and the
  tensors' diagnostics (:mod:`metamerge.staging`).

Each tensor's bytes depend only on its inputs and the spec, so the output is the same whatever
unit runs where, on how many workers or threads.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MergeError
from .io.direct import RangeWriter, read_range
from .loading import Workspace
from .norms import task_vector_statistics
from .refs import ResolvedModel
from .staging import UnitRange, write_record
from .tensor_merge import merge_tensor


@dataclass(frozen=True)
class MergeSpec:
    """Everything a worker needs to reopen a merge's inputs: the recipe and the pinned inputs."""

    key: str
    run: str      # one merge run: its inputs (and their random streams) are opened afresh per run
    recipe: object  # metamerge.recipe.Recipe (pydantic, picklable)
    resolved: dict[str, ResolvedModel]
    device: str
    allow_pickle: bool


@dataclass(frozen=True)
class NormUnit:
    spec: MergeSpec
    index: int
    entries: tuple[int, ...]      # which of the method's entries (fine-tunes) to compute
    names: tuple[str, ...]
    nbytes: int                   # what it reads (for progress)


@dataclass(frozen=True)
class MergeUnit:
    spec: MergeSpec
    range: UnitRange
    stage: str                    # the staging directory (shared storage on a cluster)
    model_stats: tuple[float, ...] | None
    # tied targets written by earlier units, to copy rather than merge again: (name, file, start,
    # end); only for an order-dependent method, whose units run in order (a second merge of a
    # tensor would draw from its random stream again)
    tied: tuple[tuple[str, str, int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return self.range.nbytes


_OPEN: dict[str, object] = {}
COPY_CHUNK = 16 << 20


def where() -> str:
    """This worker, as an error message names it: a Dask worker's address, else host and pid."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"process {os.getpid()} on {socket.gethostname()}"


def _check_visible(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            raise MergeError(f"{where()} cannot see {p}; inputs and the output directory must be on storage "
                             "every worker can read (a shared filesystem), at the same path")


def open_spec(spec: MergeSpec):
    """The merge's opened inputs in this process (headers read once per process and spec)."""
    inputs = _OPEN.get(spec.run)
    if inputs is None:
        from .engine import MergeOptions, open_inputs

        _check_visible([m.path for m in spec.resolved.values()])
        _OPEN.clear()
        inputs = open_inputs(spec.recipe, MergeOptions(device=spec.device, allow_pickle=spec.allow_pickle,  # type: ignore[arg-type]
                                                       progress=False), spec.resolved)
        _OPEN[spec.run] = inputs
    return inputs


def _device(spec: MergeSpec) -> torch.device:
    from .device import resolve_device

    return resolve_device(spec.device)


def run_norm_unit(unit: NormUnit) -> list[dict[str, float]]:
    """The method's statistic of each of ``unit.entries``' task vectors on ``unit.names``."""
    inputs = open_spec(unit.spec)
    assert inputs.base_reader is not None
    return task_vector_statistics(inputs.method, list(unit.entries), inputs.base_reader,
                                  [inputs.readers[i] for i in unit.entries], list(unit.names),
                                  device=_device(unit.spec), cast_dtype=inputs.cast_dtype,
                                  shared_rows=inputs.plan.shared_rows)


def run_merge_unit(unit: MergeUnit) -> dict:
    """Merge ``unit.range``'s tensors into their shard in the staging directory; write and return
    the unit's record (range, sha256, diagnostics per tensor)."""
    inputs = open_spec(unit.spec)
    stage = Path(unit.stage)
    _check_visible([stage])
    device = _device(unit.spec)
    ws = Workspace(device)
    stats = list(unit.model_stats) if unit.model_stats is not None else None
    plan, r = inputs.plan, unit.range
    path = stage / r.file
    h = hashlib.sha256()
    tensors: list[dict] = []
    where_written: dict[str, tuple[int, int]] = {}  # this unit's tensors: their byte range in the shard
    out = RangeWriter(path, r.start, r.end)

    def emit(data) -> None:
        if isinstance(data, torch.Tensor):
            data = memoryview(data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        out.write(data)
        h.update(data)

    try:
        for name in r.names:
            begin = out.pos
            if name in plan.aliases:  # tied: the same bytes as its target
                target = plan.aliases[name]
                earlier = {t[0]: t[1:] for t in unit.tied}
                if target in where_written:  # written by this unit: copy its bytes
                    lo, hi = where_written[target]
                    for pos in range(lo, hi, COPY_CHUNK):
                        emit(out.read(pos, min(pos + COPY_CHUNK, hi)))
                elif target in earlier:  # written by an earlier unit (run in order): copy it
                    file, lo, hi = earlier[target]
                    read_range(stage / file, lo, hi, emit, COPY_CHUNK)
                else:  # written by another unit, maybe not yet: merge it again, same bytes
                    merge_tensor(inputs, target, ws, device, stats, emit)
                tensors.append({"name": name, "tied_to": target})
            else:
                merged = merge_tensor(inputs, name, ws, device, stats, emit)
                tensors.append({"name": name, "gram": merged.gram, "coefficients": merged.coefficients,
                                "members": list(merged.members) if merged.members is not None else None})
            where_written[name] = (begin, out.pos)
        # No fsync: a resumed merge re-hashes every recorded range, so a record that outlived its
        # data (a power cut) is caught and the unit merged again; syncing each unit cost a third of
        # the merge's time.
        out.close()
    finally:
        out.abort()
    record = {"file": r.file, "start": r.start, "end": r.end, "sha256": h.hexdigest(), "tensors": tensors}
    write_record(stage, r.index, record)
    return {"index": r.index, **record}


def statistic_total(values: dict[str, float], names: list[str]) -> float:
    """A fine-tune's whole-model statistic: its per-tensor values summed exactly (fsum), so the
    order in which units returned them does not matter."""
    return math.fsum(values[n] for n in names)
