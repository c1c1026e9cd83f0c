"""The norm pass: squared norms of fine-tunes' task vectors, tensor by tensor.

MetaGPT's whole-model coefficients need ``||tau_t||^2`` summed over every tensor before the first
merged tensor can be written. The pass is per fine-tune in its result (so it can be cached per
(base, fine-tune) and a newly landed fine-tune costs one pass), but reads the base once for all
the fine-tunes it is asked about.
"""

from __future__ import annotations

import math

import torch

from .io import ModelReader
from .loading import Workspace, load_compute, name_nonfinite
from .methods.base import MergeMethod
from .methods.metagpt import squared_norm


def task_vector_sqnorms(method: MergeMethod, indices: list[int], base: ModelReader, models: list[ModelReader],
                        names: list[str], *, device: torch.device, cast_dtype=None,
                        shared_rows: dict[str, int] | None = None, progress=None) -> list[dict[str, float]]:
    """``||sparsify(theta_t - theta_0)||^2`` per tensor for the models ``indices`` of ``method``.

    ``models`` are the readers of those fine-tunes, in the same order as ``indices``.
    """
    shared_rows = shared_rows or {}
    ws = Workspace(device)
    out: list[dict[str, float]] = [{} for _ in indices]
    for name in names:
        rows = shared_rows.get(name)
        b = load_compute(base, name, device, cast_dtype, rows=rows, workspace=ws, slot="base")
        globals_, per = method.resolve(name)
        for k, (index, reader) in enumerate(zip(indices, models)):
            tau = load_compute(reader, name, device, cast_dtype, rows=rows, workspace=ws, slot="model").sub_(b)
            entry = method.entries[index]
            sq = squared_norm(method.sparsify(name, entry.model, tau, per[index], globals_))
            if not math.isfinite(sq):  # NaN/Inf in either input propagates into the norm
                raise name_nonfinite([base, reader], name, "task vector of")
            out[k][name] = sq
        if progress is not None:
            progress(base.tensors[name].nbytes * (1 + len(indices)))
    return out
