"""One output tensor: read its sources, build task vectors, call the method, check, cast.

The whole of the per-tensor work, shared by every merge unit; it depends on nothing but the opened
inputs, the tensor's name and the whole-model statistics, which is what makes the output the same
whichever unit, process or machine computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .diagnostics import gram
from .loading import Workspace, load_compute, name_nonfinite
from .methods import TensorJob
from .methods.base import MergeOutput


@dataclass
class MergedTensor:
    tensor: torch.Tensor                      # in the output dtype, on the CPU (may be a workspace view)
    gram: list[list[float]] | None            # the task vectors' Gram matrix (None without a base)
    coefficients: list[float] | None
    members: tuple[int, ...] | None           # which models it merged (a slices recipe), else None


def merge_tensor(inputs, name: str, ws: Workspace, device: torch.device,
                 model_stats: list[float] | None) -> MergedTensor:
    """Merge output tensor ``name`` of ``inputs`` (an ``engine.Inputs``)."""
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
    result = merged
    if merged.dtype != plan.out_dtypes[name] or merged.device.type != "cpu":
        result = ws.buffer("out", tuple(merged.shape), plan.out_dtypes[name]).copy_(merged)
    return MergedTensor(result, g, out.coefficients, src.members if plan.sources else None)
