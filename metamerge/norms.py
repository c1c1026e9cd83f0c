"""The statistic pass: a method's whole-model statistic of each fine-tune, tensor by tensor.

A method that declares ``model_statistic`` (MetaGPT: ``||tau_t||^2``) needs it summed over every
tensor before the first merged tensor can be written. The pass is per fine-tune in its result (so
it can be cached per (base, fine-tune) and a newly landed fine-tune costs one pass), but reads the
base once for all the fine-tunes it is asked about. What the statistic is belongs to the method.
"""

from __future__ import annotations

import math

import torch

from .io import ModelReader
from .io.adapter import AdapterReader
from .loading import Workspace, load_compute, load_compute_flat, name_nonfinite
from .methods.base import MergeMethod
from .reduce import CHUNK
from .tensor_merge import ranged


def task_vector_statistics(method: MergeMethod, indices: list[int], base: ModelReader, models: list[ModelReader],
                           names: list[str], *, device: torch.device, cast_dtype=None,
                           shared_rows: dict[str, int] | None = None, progress=None) -> list[dict[str, float]]:
    """``method.tensor_statistic`` of ``sparsify(theta_t - theta_0)`` per tensor, for the entries
    ``indices`` of ``method``; ``models`` are their readers, in the same order."""
    shared_rows = shared_rows or {}
    ws = Workspace(device)
    out: list[dict[str, float]] = [{} for _ in indices]
    for name in names:
        rows = shared_rows.get(name)
        if rows is None and method.elementwise() and base.tensors[name].numel > 2 * CHUNK and ranged(base, *models):
            _chunked(method, indices, base, models, name, device, cast_dtype, ws, out)
            if progress is not None:
                progress(base.tensors[name].nbytes * (1 + len(indices)))
            continue
        b = load_compute(base, name, device, cast_dtype, rows=rows, workspace=ws, slot="base")
        globals_, per = method.resolve(name)
        for k, (index, reader) in enumerate(zip(indices, models)):
            if _lora_sqnorm_applies(method, globals_, reader, base, name, rows, cast_dtype):
                # LoRA hook (issue 15): this task vector is exactly s * B @ A: its squared norm from
                # the factors (an r x r computation, float64), the update is never materialised.
                assert isinstance(reader, AdapterReader)
                out[k][name] = reader.factor_sqnorm(name)
                continue
            tau = load_compute(reader, name, device, cast_dtype, rows=rows, workspace=ws, slot="model").sub_(b)
            value = method.tensor_statistic(name, index, method.sparsify(name, index, tau, per[index], globals_))
            if not math.isfinite(value):  # NaN/Inf in either input propagates into the statistic
                raise name_nonfinite([base, reader], name, "task vector of")
            out[k][name] = value
        if progress is not None:
            progress(base.tensors[name].nbytes * (1 + len(indices)))
    return out


def _chunked(method: MergeMethod, indices: list[int], base: ModelReader, models: list[ModelReader], name: str,
             device: torch.device, cast_dtype, ws: Workspace, out: list[dict[str, float]]) -> None:
    """A large tensor a ``CHUNK`` at a time: the statistic's block sums per chunk, added exactly
    (fsum), equal to the whole tensor's (``tensor_statistic_blocks``)."""
    globals_, per = method.resolve(name)
    n = base.tensors[name].numel
    blocks: list[list[float]] = [[] for _ in indices]
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        b = load_compute_flat(base, name, start, count, device, cast_dtype, workspace=ws, slot="base")
        for k, (index, reader) in enumerate(zip(indices, models)):
            tau = load_compute_flat(reader, name, start, count, device, cast_dtype, workspace=ws, slot="model").sub_(b)
            part = method.tensor_statistic_blocks(name, index, method.sparsify(name, index, tau, per[index], globals_))
            assert part is not None, f"{method.name}: elementwise but no tensor_statistic_blocks"
            blocks[k].extend(part)
    for k, (_, reader) in enumerate(zip(indices, models)):
        value = math.fsum(blocks[k])
        if not math.isfinite(value):
            raise name_nonfinite([base, reader], name, "task vector of")
        out[k][name] = value


def _lora_sqnorm_applies(method: MergeMethod, globals_, reader: ModelReader, base: ModelReader, name: str,
                         rows: int | None, cast_dtype) -> bool:
    """Whether the statistic of ``name`` may be taken from an adapter's factors: the statistic is the
    squared norm, nothing sparsifies the task vector, the adapter is over this same base and changes
    this tensor by a LoRA update only, and no narrowing ``dtype`` cast or shared-row cut applies (each
    would change the task vector the full path measures)."""
    return (isinstance(reader, AdapterReader) and method.model_statistic == "sqnorm"
            and not method.sparsifies(globals_) and rows is None
            and cast_dtype in (None, torch.float32, torch.float64) and reader.is_lora_update(name)
            and reader.base_path.resolve() == base.path.resolve())
