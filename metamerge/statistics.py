"""A method's whole-model statistic (MetaGPT: each fine-tune's squared task-vector norms): from
the caller, the cache (``METAMERGE_CACHE_DIR``, by content) or norm units, and stored back.

Kept apart from :mod:`metamerge.engine` (planning and finalize) because the pipeline's norm step,
``--as-adapter`` and the estimate read it too, without merging anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import cache
from .norms import task_vector_statistics
from .progress import progress_bar
from .units import MergeSpec, NormUnit

if TYPE_CHECKING:
    from .engine import Inputs
    from .refs import ResolvedModel

NORM_UNIT_BYTES = 512 << 20  # a norm unit: this many bytes of the base (and as many per fine-tune)


def compute_statistics(inputs: Inputs, indices: list[int], device: torch.device,
                       progress: bool = True) -> list[dict[str, float]]:
    """The method's statistic pass for the entries ``indices`` (MetaGPT: squared norms of each
    sparsified task vector), per tensor, one dict per entry, in this process."""
    names = statistic_names(inputs)
    assert inputs.base_reader is not None, "a model statistic is of task vectors: the method needs a base"
    total = sum(inputs.base_reader.tensors[n].nbytes for n in names) * (1 + len(indices))
    with progress_bar(total, inputs.method.model_statistic or "statistics", progress, unit="B", unit_scale=True) as bar:
        return task_vector_statistics(inputs.method, indices, inputs.base_reader,
                                      [inputs.readers[i] for i in indices], names,
                                      device=device, cast_dtype=inputs.cast_dtype,
                                      shared_rows=inputs.plan.shared_rows, progress=bar.update)


def fine_tune_statistics(inputs: Inputs, index: int, device: torch.device) -> tuple[dict[str, float], bool]:
    """Entry ``index``'s statistic per tensor, and whether it came from the cache: the one norm
    cache, shared by ``metamerge merge`` and the pipeline (keyed by content, :mod:`metamerge.cache`)."""
    found, keys = cached_statistics(inputs, device)
    if index in found:
        return found[index], True
    (values,) = compute_statistics(inputs, [index], device, progress=False)
    if index in keys:
        cache.store_statistics(keys[index], values, {"base": inputs.base.ref if inputs.base else None,
                                                     "model": inputs.models[index].ref})
    return values, False


def statistic_names(inputs: Inputs) -> list[str]:
    return [n for n in inputs.plan.names if n not in inputs.plan.aliases]


def norm_units(spec: MergeSpec, inputs: Inputs, indices: list[int]) -> list[NormUnit]:
    assert inputs.base_reader is not None
    units: list[NormUnit] = []
    group: list[str] = []
    size = 0
    for name in statistic_names(inputs):
        group.append(name)
        size += inputs.base_reader.tensors[name].nbytes
        if size >= NORM_UNIT_BYTES:
            units.append(NormUnit(spec, len(units), tuple(indices), tuple(group), size * (1 + len(indices))))
            group, size = [], 0
    if group:
        units.append(NormUnit(spec, len(units), tuple(indices), tuple(group), size * (1 + len(indices))))
    return units


def cached_statistics(inputs: Inputs, device: torch.device) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """Entries whose statistic the cache holds (by content: base and fine-tune hashes known without
    hashing), and the cache key of every entry whose content is known (to store the rest later)."""
    from .refs import known_model_hash

    method, base = inputs.method, inputs.base
    assert base is not None
    names = statistic_names(inputs)

    def content(m: ResolvedModel) -> str | None:
        if m.source != "local" or m.files:
            return m.revision
        return known_model_hash(m.path)

    base_rev = content(base)
    found: dict[int, dict[str, float]] = {}
    keys: dict[int, str] = {}
    for i, model in enumerate(inputs.models):
        rev = content(model)
        if base_rev is None or rev is None:
            continue
        keys[i] = cache.statistics_key(base_rev, rev, method.statistics_key(i), names, device.type)
        values = cache.load_statistics(keys[i])
        if values is not None and set(values) == set(names):
            found[i] = values
    return found, keys


def store_statistics(inputs: Inputs, computed: dict[int, dict[str, float]], device: torch.device) -> None:
    """After the inputs are hashed: remember what the norm pass computed, by content."""
    names = statistic_names(inputs)
    assert inputs.base is not None
    for i, values in computed.items():
        model = inputs.models[i]
        key = cache.statistics_key(inputs.base.revision, model.revision, inputs.method.statistics_key(i),
                                   names, device.type)
        cache.store_statistics(key, values, {"base": inputs.base.ref, "model": model.ref})
