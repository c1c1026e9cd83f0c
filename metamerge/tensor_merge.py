"""One output tensor: read its sources, build task vectors, call the method, check, cast, emit.

The whole of the per-tensor work, shared by every merge unit; it depends on nothing but the opened
inputs, the tensor's name and the whole-model statistics, which is what makes the output the same
whichever unit, process or machine computes it.

A large tensor of an elementwise method (``MergeMethod.elementwise``: MetaGPT with whole-model
lambdas, task arithmetic without sparsification) is merged ``CHUNK`` entries at a time: each input
read as that byte range, the arithmetic done on a few MB that stay in the CPU cache, the result
emitted before the next chunk is read. The memory per worker is then a few chunks, not several
float32 copies of the largest tensor, and the bytes and the diagnostics are those of the whole
tensor (entries are independent; the Gram matrix is built from the same block sums).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .diagnostics import fsum_gram, gram, gram_blocks
from .io import ModelReader
from .loading import Workspace, load_compute, load_compute_flat, name_nonfinite
from .methods import TensorJob
from .methods.base import MergeOutput
from .reduce import CHUNK
from .shapes import numel

Emit = Callable[[torch.Tensor], None]  # receives the output bytes of a tensor in order (CPU, out dtype)


@dataclass
class MergedTensor:
    gram: list[list[float]] | None            # the task vectors' Gram matrix (None without a base)
    coefficients: list[float] | None
    members: tuple[int, ...] | None           # which models it merged (a slices recipe), else None


def chunked(inputs, name: str) -> bool:
    """Whether ``name`` is merged a chunk at a time (see the module's docstring)."""
    plan, method = inputs.plan, inputs.method
    return (method.elementwise() and method.task_vectors and inputs.base_reader is not None
            and not plan.sources and plan.extend_from is None and name not in plan.shared_rows
            and numel(plan.out_shapes[name]) > 2 * CHUNK and ranged(inputs.base_reader, *inputs.readers))


def ranged(*readers) -> bool:
    """Whether every reader reads byte ranges of its files (a plain safetensors folder); other
    input kinds (an adapter computing its update) are merged whole."""
    return all(type(r) is ModelReader for r in readers)


def merge_tensor(inputs, name: str, ws: Workspace, device: torch.device, model_stats: list[float] | None,
                 emit: Emit) -> MergedTensor:
    """Merge output tensor ``name`` of ``inputs`` (an ``engine.Inputs``); its bytes go to ``emit``."""
    if chunked(inputs, name):
        return _merge_chunks(inputs, name, ws, device, model_stats, emit)
    return _merge_whole(inputs, name, ws, device, model_stats, emit)


def _cast(ws: Workspace, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype or t.device.type != "cpu":
        return ws.buffer("out", tuple(t.shape), dtype).copy_(t)
    return t


def _merge_chunks(inputs, name: str, ws: Workspace, device: torch.device, model_stats: list[float] | None,
                  emit: Emit) -> MergedTensor:
    method, base_reader, readers = inputs.method, inputs.base_reader, inputs.readers
    globals_, per = method.resolve(name)
    k, n = len(readers), numel(inputs.plan.out_shapes[name])
    blocks: list[list[list[float]]] = [[[] for _ in range(k)] for _ in range(k)]
    coefficients = None
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        base = load_compute_flat(base_reader, name, start, count, device, inputs.cast_dtype, workspace=ws, slot="base")
        taus = [load_compute_flat(r, name, start, count, device, inputs.cast_dtype, workspace=ws, slot=f"m{i}").sub_(base)
                for i, r in enumerate(readers)]
        part = gram_blocks(taus)
        for i in range(k):
            if not math.isfinite(math.fsum(part[i][i])):
                raise name_nonfinite([base_reader, *readers], name)
            for j in range(i, k):
                blocks[i][j].extend(part[i][j])
        deltas = [method.sparsify(name, i, tau, per[i], globals_) for i, tau in enumerate(taus)]
        out = method.merge(TensorJob(name, base, [], deltas, per, globals_, model_stats))
        coefficients = out.coefficients
        emit(_cast(ws, out.tensor, inputs.plan.out_dtypes[name]))
    for i in range(k):
        for j in range(i + 1, k):
            blocks[j][i] = blocks[i][j]
    return MergedTensor(fsum_gram(blocks), coefficients, None)


def _merge_whole(inputs, name: str, ws: Workspace, device: torch.device, model_stats: list[float] | None,
                 emit: Emit) -> MergedTensor:
    plan, pool, method = inputs.plan, inputs.pool, inputs.method
    rows = plan.shared_rows.get(name)
    src = inputs.source(name)
    read = ([src.base] if src.base else []) + list(src.inputs)  # (pool index, name) pairs
    tensors = [load_compute(pool[i], n, device, inputs.cast_dtype, rows, workspace=ws, slot=f"m{k}")
               for k, (i, n) in enumerate(src.inputs)]
    globals_, per = method.resolve(name) if src.scope is None else method.resolve(name, src.scope)
    base = deltas = g = None
    if src.base is not None:
        base = load_compute(pool[src.base[0]], src.base[1], device, inputs.cast_dtype, rows,
                            workspace=ws, slot="base")
    if base is not None and not src.inputs:  # a slice of only its base: the base, as it is
        out = MergeOutput(base, [])
    else:
        if base is not None and method.task_vectors:
            taus = [x.sub_(base) for x in tensors]  # in place: the raw weights are not needed again
            g = gram(taus)
            if not all(math.isfinite(g[i][i]) for i in range(len(g))):
                raise name_nonfinite([pool[i] for i, _ in read], name, names=[n for _, n in read])
            deltas = [method.sparsify(name, i, tau, per[i], globals_) for i, tau in enumerate(taus)]
            tensors = []
        out = method.merge(TensorJob(name, base, tensors, deltas, per, globals_, model_stats))
    merged = out.tensor
    if g is None and not bool(torch.isfinite(merged.sum())):
        raise name_nonfinite([pool[i] for i, _ in read], name, names=[n for _, n in read])
    if plan.extend_from is not None and plan.out_shapes[name][0] > merged.shape[0]:
        donor = inputs.readers[plan.extend_from]
        extra = donor.get(name)[merged.shape[0]:]
        if not bool(torch.isfinite(extra).all()):  # rows no task vector saw: check them here
            raise name_nonfinite([donor], name)
        merged = torch.cat([merged, extra.to(device=device, dtype=merged.dtype)])
    emit(_cast(ws, merged, plan.out_dtypes[name]))
    return MergedTensor(g, out.coefficients, src.members if plan.sources else None)
