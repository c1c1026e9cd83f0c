"""The norm pass: squared norms of one fine-tune's task vector, tensor by tensor.

MetaGPT's whole-model coefficients need ``||tau_t||^2`` summed over every tensor before the first
merged tensor can be written. This pass reads one fine-tune and the base, so its result can be
cached per (base, fine-tune) and a newly landed fine-tune costs one pass, not one per model.
"""

from __future__ import annotations

import torch

from .io import ModelReader
from .loading import load_compute
from .methods.base import MergeMethod
from .methods.metagpt import squared_norm


def task_vector_sqnorms(method: MergeMethod, index: int, base: ModelReader, model: ModelReader,
                        names: list[str], *, device: torch.device, cast_dtype=None,
                        shared_rows: dict[str, int] | None = None, progress=None) -> dict[str, float]:
    """``||sparsify(theta_t - theta_0)||^2`` per tensor for model ``index`` of ``method``."""
    entry = method.entries[index]
    shared_rows = shared_rows or {}
    out: dict[str, float] = {}
    for name in names:
        b = load_compute(base, name, device, cast_dtype, rows=shared_rows.get(name))
        x = load_compute(model, name, device, cast_dtype, rows=shared_rows.get(name))
        tau = x.sub_(b)
        del b
        globals_, per = method.resolve(name)
        out[name] = squared_norm(method.sparsify(name, entry.model, tau, per[index], globals_))
        if progress is not None:
            progress(base.tensors[name].nbytes)
    return out
