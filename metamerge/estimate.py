"""What a merge will cost, before it runs: the ``metamerge merge --dry-run`` figures.

From the opened inputs (headers only; no tensor is read):

``inputs``        every model read, with its path and the bytes of the tensors the merge reads from it
``read_bytes``    bytes read over all passes: a method with a per-model statistic (MetaGPT's
                  ||tau||^2) reads every input twice, once for the statistic and once for the merge
``write_bytes``   the merged weights (``Plan.total_bytes``)
``passes``        ``statistics`` (when the method needs one) then ``merge``
``peak_memory_bytes``  all processes: this one (Python, torch: ``PROCESS_BYTES``) plus, per worker
                  (``WORKER_BYTES`` each), its buffers: for an elementwise method (MetaGPT with
                  whole-model lambdas, task arithmetic without sparsification) a few ``CHUNK``-entry
                  buffers, whatever the model's size; otherwise, for the largest tensor, one
                  compute-dtype copy per input read for it, the output copy, and the method's work
                  buffers (``WORK_SLOTS``): there the largest tensor sets the peak.
``seconds``       ``STARTUP_S``, then the statistics pass at ``STAT_BYTES_PER_S`` of input, then the
                  merge pass at the method's ``MERGE_BYTES_PER_S`` of input (all workers together).

The constants are calibrated on the README's scale-out benchmark (2 CPU cores, 2 workers, bf16
inputs, inputs in the page cache, output written around the page cache): at 1B parameters and 3
fine-tunes the formulas give 11.6 s and 0.6 GiB for ``metagpt`` with an empty cache (measured
11.5 s / 0.59 GiB, median of 3) and 8.2 s with its norms cached (8.2 s); 10.2 s for
``task_arithmetic`` (measured 9.8-12.6 s, median 10.2 s). The
rates of the methods that are not elementwise were measured before the scale-out, in one process.
A merge of a single unit runs in the command's own process (no worker). Treat ``seconds`` as an
order of magnitude elsewhere: it scales with the disk, the cores and the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .loading import compute_dtype
from .shapes import numel

PROCESS_BYTES = 300_000_000        # Python + torch + the readers' headers, before any tensor
WORKER_BYTES = 150_000_000         # a worker process's own share (torch's libraries are shared pages)
STARTUP_S = 2.5                    # imports, the workers' start, planning
STAT_BYTES_PER_S = 2.0e9           # the statistic pass, chunked: read, subtract, square-sum (no write)
ELEMENTWISE_MERGE_BYTES_PER_S = {  # chunked merge pass, input bytes per second (2 workers)
    "metagpt": 1.2e9, "task_arithmetic": 0.89e9,
}
DEFAULT_MERGE_BYTES_PER_S = 0.23e9
MERGE_BYTES_PER_S = {              # input bytes merged per second, whole tensors (one process)
    "metagpt": 0.37e9, "task_arithmetic": 0.23e9, "linear": 0.23e9, "ties": 0.026e9, "dare_ties": 0.052e9, "dare_linear": 0.06e9,
}


def work_slots(method: str, n_models: int) -> int:
    """Extra compute-dtype copies of one tensor a method holds at once, beyond its inputs and output:
    MetaGPT sums in place (2); the task-arithmetic family stacks its deltas (3 per model); TIES-style
    sign election sorts and masks (7 per model)."""
    if method == "metagpt":
        return 2
    if "ties" in method or method in ("sce", "breadcrumbs", "della"):
        return 7 * n_models
    return 3 * n_models


@dataclass
class InputCost:
    ref: str
    path: str
    read_bytes: int  # one pass


@dataclass
class Estimate:
    method: str
    inputs: list[InputCost]
    passes: list[str]
    read_bytes: int
    write_bytes: int
    largest_tensor: str
    peak_memory_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The estimate in words, one fact a line."""
        out = [f"method {self.method}; passes: {', '.join(self.passes)}"]
        out += [f"input {i.ref}: {_size(i.read_bytes)} per pass" for i in self.inputs]
        out += [f"read {_size(self.read_bytes)}, write {_size(self.write_bytes)}",
                f"peak memory about {_size(self.peak_memory_bytes)} (largest tensor {self.largest_tensor})",
                f"time about {_duration(self.seconds)} on CPU (2-core benchmark rates; see metamerge/estimate.py)"]
        return out + [f"note: {n}" for n in self.notes]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def estimate_recipe(recipe, options=None) -> Estimate:
    """Open ``recipe``'s inputs (headers only, files not hashed) and estimate their merge."""
    from dataclasses import replace

    from .device import resolve_device
    from .engine import MergeOptions, open_inputs
    from .statistics import cached_statistics

    options = replace(options or MergeOptions(), hash_inputs=False, progress=False)
    inputs = open_inputs(recipe, options)
    cached = False
    if inputs.method.needs_model_statistics() and inputs.base is not None and options.use_cache:
        found, _ = cached_statistics(inputs, resolve_device(options.device))
        cached = len(found) == len(inputs.models)  # every norm in METAMERGE_CACHE_DIR: no norm pass
    return estimate(inputs, recipe.merge_method, stats_cached=cached, workers=options.executor.workers(),
                    unit_bytes=options.unit_bytes)


def estimate(inputs, method: str, stats_cached: bool = False, workers: int | None = None,
             unit_bytes: int = 256 << 20) -> Estimate:
    """The cost of merging ``inputs`` (``engine.open_inputs``'s result) with ``method``, from the
    headers; ``stats_cached``: the per-model statistics are cached; ``workers``: worker processes
    (default: as ``metamerge merge`` picks them)."""
    from .executors import ExecutorConfig
    from .reduce import CHUNK
    from .tensor_merge import chunked

    workers = workers or ExecutorConfig().workers()
    plan, pool = inputs.plan, inputs.pool
    per_reader = [0] * len(pool)
    largest, largest_elems, largest_reads = "", 0, 0
    for name in plan.names:
        if name in plan.aliases:  # a tied tensor is a copy of one already merged: nothing read
            continue
        src = inputs.source(name)
        reads = ([src.base] if src.base else []) + list(src.inputs)
        for i, n in reads:
            per_reader[i] += pool[i].tensors[n].nbytes
        elems = numel(plan.out_shapes[name])
        if elems > largest_elems:
            largest, largest_elems, largest_reads = name, elems, len(reads)
    needs_stats = inputs.method.needs_model_statistics() and not stats_cached
    passes = (["statistics"] if needs_stats else []) + ["merge"]
    one_pass = sum(per_reader)
    stat_bytes = one_pass if needs_stats else 0  # the statistic pass reads what the merge reads
    c = compute_dtype(inputs.cast_dtype).itemsize
    out_bytes = max((plan.out_dtypes[n].itemsize for n in plan.names), default=4)
    slots = largest_reads + work_slots(method, len(inputs.readers))
    elementwise = bool(largest) and chunked(inputs, largest)
    buffers = (largest_reads + 2) * CHUNK * (c + 2) if elementwise else largest_elems * (c * slots + out_bytes)
    units = max(1, -(-plan.total_bytes // unit_bytes))
    workers = min(workers, units)
    peak = PROCESS_BYTES + (buffers if workers == 1 else workers * (WORKER_BYTES + buffers))
    if elementwise:
        rate, notes = ELEMENTWISE_MERGE_BYTES_PER_S.get(method, ELEMENTWISE_MERGE_BYTES_PER_S["task_arithmetic"]), []
    else:
        rate = MERGE_BYTES_PER_S.get(method, DEFAULT_MERGE_BYTES_PER_S)
        notes = [] if method in MERGE_BYTES_PER_S else [f"no benchmark rate for {method}: the task-arithmetic rate is used"]
    seconds = STARTUP_S + stat_bytes / STAT_BYTES_PER_S + one_pass / rate
    costs = [InputCost(r.label, str(r.path), per_reader[i]) for i, r in enumerate(pool)]
    return Estimate(method, costs, passes, one_pass + stat_bytes, plan.total_bytes, largest, int(peak),
                    round(seconds, 1), notes)
