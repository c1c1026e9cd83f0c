"""The merge: a plan, then units, then the finalize step.

Memory holds the base and one tensor per fine-tune at a time, never a model. Order of work:
resolve and pin every input, check headers and plan the output (no tensor read yet), run the norm
units if the method needs whole-model norms that are not cached (:mod:`metamerge.statistics`), then
the merge units (:mod:`metamerge.units`, cut by :mod:`metamerge.unit_plan`) write their byte ranges
into a staging directory that becomes OUT, renamed into place only when everything, report and
provenance included (:mod:`metamerge.finalize`), is written.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, staging
from .atomic import out_lock, publish
from .checks import Plan, TensorSource, plan_merge
from .device import resolve_device
from .errors import MergeError
from .executors import ExecutorConfig, WorkerLost, run_units
from .finalize import PROVENANCE, provenance_of, report_of, write_side_files
from .io import ModelReader, parse_size
from .io.writer import index_text, shard_layout
from .loading import DTYPES, open_reader
from .methods import get_method
from .methods.base import MergeMethod
from .progress import progress_bar
from .recipe import Recipe
from .refs import BackgroundHashes, ModelRef, ResolvedModel, model_files, resolve, sha256_file, with_base
from .report import MergeReport
from .slices import plan_slices, slices_of
from .statistics import (
    cached_statistics,
    norm_units,
    statistic_names,
    store_statistics,
)
from .unit_plan import gather_diagnostics, tied_locations, unit_ranges
from .units import MergeSpec, MergeUnit, NormUnit, run_merge_unit, run_norm_unit, statistic_total

UNIT_BYTES = 256 << 20  # a merge unit: enough work to hide its overhead, small enough to spread


@dataclass
class MergeOptions:
    device: str = "auto"
    overwrite: bool = False
    allow_pickle: bool = False
    max_shard_size: str | int = "5GB"
    progress: bool = True
    hash_inputs: bool = True
    wait: bool = False  # another merge writing the same OUT: wait for it instead of failing at once
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # where units run
    unit_bytes: int = UNIT_BYTES  # output bytes per merge unit (part of the plan, not of the workers)
    use_cache: bool = True        # METAMERGE_CACHE_DIR: file hashes and per-fine-tune statistics
    # who runs the units instead of ``executor`` (a caller above the core, e.g. as workflow tasks):
    # ``runner(fn, units, on_done) -> results in unit order``
    runner: Callable[..., list] | None = None


@dataclass
class MergeResult:
    out_dir: Path | None
    plan: Plan
    report: MergeReport | None = None
    provenance: dict = field(default_factory=dict)


def _bar(total: int, desc: str, enabled: bool):
    return progress_bar(total, desc, enabled, unit="B", unit_scale=True)


@dataclass
class Inputs:
    """Every input pinned and opened: the base (if the method uses one) and the merged models.

    ``pool`` is every reader a tensor is read from, as ``TensorSource`` indexes them: the base and
    the models for a whole-model recipe, every referenced model for a slices recipe (where
    ``donor`` is the model whose config and generation config the output takes).
    """

    method: MergeMethod
    base: ResolvedModel | None
    models: list[ResolvedModel]
    tokenizer: ResolvedModel
    readers: list[ModelReader]
    base_reader: ModelReader | None
    plan: Plan
    cast_dtype: torch.dtype | None
    pool: list[ModelReader] = field(default_factory=list)
    donor: tuple[ResolvedModel, ModelReader] | None = None
    resolved: dict[str, ResolvedModel] = field(default_factory=dict)  # every reference, pinned

    def __post_init__(self):
        if not self.pool:
            self.pool = ([self.base_reader] if self.base_reader else []) + self.readers

    @property
    def reference(self) -> ModelReader:
        return self.donor[1] if self.donor else (self.base_reader or self.readers[0])

    def source(self, name: str) -> TensorSource:
        """Where output tensor ``name`` is read from: the plan's entry for a slices recipe, else the
        same name in the base (if any) and in every model."""
        src = self.plan.sources.get(name)
        if src is not None:
            return src
        first = 1 if self.base_reader else 0
        return TensorSource(base=(0, name) if self.base_reader else None,
                            inputs=tuple((first + i, name) for i in range(len(self.readers))),
                            members=tuple(range(len(self.readers))), scope=None)


def open_inputs(recipe: Recipe, options: MergeOptions,
                resolved: dict[str, ResolvedModel] | None = None) -> Inputs:
    """Resolve references (or take them pinned by the caller), open readers, plan the output."""
    resolved = dict(resolved or {})

    def pin(ref: str) -> ResolvedModel:
        if ref not in resolved:
            # Local folders without a pinned revision are hashed later, beside the merge.
            defer = options.hash_inputs and "@" not in ref and "+" not in ref and ModelRef.parse(ref).is_local()
            resolved[ref] = resolve(ref, hash_files=options.hash_inputs and not defer)
        if resolved[ref].adapter and resolved[ref].base_path is None:  # a bare adapter folder: over the base
            base = resolved[ref] if ref == recipe.base_model else pin(recipe.base_model) if recipe.base_model else None
            resolved[ref] = with_base(resolved[ref], base)  # (an adapter as base_model is refused there)
        return resolved[ref]

    method_cls = get_method(recipe.merge_method)
    if recipe.slices:
        inputs = _open_slices(recipe, options, pin, method_cls)
        inputs.resolved = resolved
        return inputs
    base = pin(recipe.base_model) if recipe.base_model and method_cls.uses_base(recipe) else None
    models = [pin(e.model) for e in method_cls.input_entries(recipe)]
    base_reader = open_reader(base, f"base '{base.ref}'", allow_pickle=options.allow_pickle) if base else None
    readers = [open_reader(m, f"model '{m.ref}'", allow_pickle=options.allow_pickle) for m in models]
    ref_reader = base_reader or readers[0]
    method = method_cls(recipe, num_layers=_num_layers(ref_reader.config()))
    cast = DTYPES[recipe.dtype] if recipe.dtype else None
    out = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
    plan = plan_merge(ref_reader, readers if base_reader else readers[1:],
                      vocab_policy=recipe.vocab_policy, out_dtype=out, cast_dtype=cast)
    if not base_reader and plan.extend_from is not None:
        plan.extend_from += 1
    tokenizer = _tokenizer(recipe, base or models[0], pin)
    if plan.extend_from is not None and tokenizer is not models[plan.extend_from]:
        raise MergeError(f"vocab_policy: extend takes the extra rows from '{models[plan.extend_from].ref}'; "
                         "set tokenizer_source to that model so the tokenizer matches")
    return Inputs(method, base, models, tokenizer, readers, base_reader, plan, cast, resolved=resolved)


def _tokenizer(recipe: Recipe, default: ResolvedModel, pin) -> ResolvedModel:
    tok_ref = recipe.tokenizer_source or "base"
    if tok_ref == "union":
        raise MergeError("tokenizer_source: union is not supported; use base or one model's reference")
    return default if tok_ref == "base" else pin(tok_ref)


def _open_slices(recipe: Recipe, options: MergeOptions, pin, method_cls) -> Inputs:
    """A slices recipe: every referenced model opened; the plan maps each output tensor to the
    tensors it is merged from (``slices.plan_slices``). The output's config and, by default, its
    tokenizer come from the base model, else the first slice's first source (mergekit's donor)."""
    refs = recipe.referenced_models()
    pinned = {ref: pin(ref) for ref in refs}
    pool = {ref: open_reader(m, f"model '{ref}'", allow_pickle=options.allow_pickle) for ref, m in pinned.items()}
    donor = recipe.base_model or slices_of(recipe)[0].sources[0].model
    cast = DTYPES[recipe.dtype] if recipe.dtype else None
    plan, labels = plan_slices(recipe, method_cls, pool, donor, cast_dtype=cast,
                               out_dtype=DTYPES[recipe.out_dtype] if recipe.out_dtype else None)
    base_ref = recipe.base_model if method_cls.uses_base(recipe) else None
    base = pinned[base_ref] if base_ref else None
    return Inputs(method_cls(recipe), base, [pinned[ref] for ref in labels],
                  _tokenizer(recipe, pinned[donor], pin), [pool[ref] for ref in labels],
                  pool[base_ref] if base_ref else None, plan, cast,
                  pool=list(pool.values()), donor=(pinned[donor], pool[donor]))


def _num_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def merge(recipe: Recipe, out_dir: str | Path | None, options: MergeOptions | None = None, *,
          stats: dict[str, dict[str, float]] | None = None,
          resolved: dict[str, ResolvedModel] | None = None,
          recipe_text: str | None = None, dry_run: bool = False,
          log: Callable[[str], None] | None = None) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir`` (atomically, resumably).

    ``stats`` (reference -> tensor -> the method's statistic, e.g. MetaGPT's ||tau||^2) and
    ``resolved`` (reference -> pinned model) let a caller pass in what it has; anything missing is
    taken from the cache (:mod:`metamerge.cache`) or computed here, by ``options.executor``.
    """
    options = options or MergeOptions()
    device = resolve_device(options.device)
    parse_size(options.max_shard_size)  # a bad size fails before any work, dry runs included
    inputs = open_inputs(recipe, options, resolved)
    plan = inputs.plan
    if out_dir is not None and Path(out_dir).exists() and not options.overwrite:
        raise MergeError(f"{Path(out_dir).absolute()} already exists; choose another output directory or pass --overwrite")
    if dry_run or out_dir is None:
        return MergeResult(None, plan)

    out = Path(out_dir).absolute()
    pinned = [inputs.base, *inputs.models, inputs.tokenizer] + ([inputs.donor[0]] if inputs.donor else [])
    _refuse_out_over_input(out, [m for m in pinned if m is not None])
    import uuid

    spec = MergeSpec(key=plan_key(recipe, inputs, options, device), run=uuid.uuid4().hex, recipe=recipe,
                     resolved=dict(inputs.resolved), device=device.type, allow_pickle=options.allow_pickle)
    stage = staging.staging_dir(out, spec.key)
    with out_lock(out, wait=options.wait, keep=stage.name):  # one writer per OUT, until the final rename
        if out.exists() and not options.overwrite:  # finished by the writer we waited for
            raise MergeError(f"{out} already exists; choose another output directory or pass --overwrite")
        # Local inputs are hashed on a thread while the merge runs (sha256 releases the GIL), from
        # the cache when their files have not changed.
        with BackgroundHashes(pinned if options.hash_inputs else []) as hashes:
            return _merge_into(recipe, out, options, inputs, device, stats, recipe_text, log, hashes, spec, stage)


def plan_key(recipe: Recipe, inputs: Inputs, options: MergeOptions, device: torch.device) -> str:
    """What the staged bytes depend on: the recipe, each input's identity (its pinned revision, or
    each file's device, inode, size and mtime for a local folder not hashed yet), the layout and
    the device kind. A resumed merge reuses staged units only under the same key."""
    import hashlib
    import os

    def identity(m: ResolvedModel) -> object:
        if m.files or m.source != "local":
            return m.revision
        return [(p.name, *(lambda st: (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))(os.stat(p)))
                for p in model_files(m.path)]

    blob = json.dumps({"recipe": recipe.sha256(), "inputs": {r: identity(m) for r, m in sorted(inputs.resolved.items())},
                       "max_shard_size": parse_size(options.max_shard_size), "unit_bytes": options.unit_bytes,
                       "device": device.type, "code": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_free_space(out_dir: Path, need: int) -> None:
    """Fail before writing when the weights cannot fit: a full disk mid-merge wastes the whole run."""
    where = out_dir.absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise MergeError(f"{out_dir.absolute()}: the merged weights need {need / 1e9:.2f} GB but only "
                         f"{free / 1e9:.2f} GB are free there; free space or choose another output directory")


def _refuse_out_over_input(out_dir, models) -> None:
    """OUT may not be, contain or lie inside an input: --overwrite would delete the model being read."""
    out = Path(out_dir).absolute().resolve()
    for m in models:
        p = Path(m.path).absolute().resolve()
        how = "is" if out == p else "contains" if out in p.parents else "lies inside" if p in out.parents else None
        if how:
            raise MergeError(f"{Path(out_dir).absolute()}: the output directory {how} the input '{m.ref}' ({p}); "
                             "choose an output directory outside every input")


def _merge_into(recipe: Recipe, out: Path, options: MergeOptions, inputs: Inputs, device: torch.device,
                stats, recipe_text: str | None, log, hashes: BackgroundHashes, spec: MergeSpec,
                stage: Path) -> MergeResult:
    plan, method = inputs.plan, inputs.method
    labels = [m.ref for m in inputs.models]
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    shards = shard_layout([(n, plan.out_shapes[n], plan.out_dtypes[n]) for n in plan.names],
                          parse_size(options.max_shard_size))
    units = unit_ranges(shards, options.unit_bytes)
    _check_free_space(out, plan.total_bytes)
    hasher = None
    try:
        staging.prepare(stage, shards)
        hasher = staging.ShardHasher(stage, shards)
        runner = options.runner
        executor = options.executor
        if device.type == "cuda" and executor.kind == "local" and executor.n_workers is None:
            executor = ExecutorConfig(kind="local", n_workers=1)  # one process drives the GPU
        if method.order_dependent():  # one random stream across tensors: in order, here, from the start
            runner, executor = None, ExecutorConfig(kind="local", n_workers=1)
            done = {}
        else:
            done = staging.completed(stage, units)

        def execute(fn, work, on_done):
            return runner(fn, work, on_done) if runner else run_units(fn, work, executor, on_done)

        if done:
            say(f"resuming: {len(done)}/{len(units)} units already complete")

        # the statistic pass: from the caller, else the cache, else norm units
        model_stats = None
        norm_todo: list[NormUnit] = []
        computed: dict[int, dict[str, float]] = {}
        if method.needs_model_statistics():
            stats = dict(stats or {})
            missing = [i for i, e in enumerate(method.entries) if e.model not in stats]
            if missing and options.use_cache:
                found, _ = cached_statistics(inputs, device)
                for i in list(missing):
                    if i in found:
                        stats[method.entries[i].model] = found[i]
                        missing.remove(i)
            if missing:
                norm_todo = norm_units(spec, inputs, missing)
        todo = [u for u in units if u.index not in done]
        total = sum(u.nbytes for u in norm_todo) + sum(u.nbytes for u in todo)
        with _bar(total, "merge", options.progress) as bar:
            if norm_todo:
                parts = execute(run_norm_unit, norm_todo, lambda u, _: bar.update(u.nbytes))
                for k, i in enumerate(norm_todo[0].entries):
                    values: dict[str, float] = {}
                    for part in parts:
                        values.update(part[k])
                    computed[i] = values
                    stats[method.entries[i].model] = values
            if stats is not None and method.needs_model_statistics():
                # summed exactly (fsum): the same whatever order the tensors' statistics arrived in
                model_stats = [statistic_total(stats[e.model], statistic_names(inputs)) for e in method.entries]
            tied = tied_locations(plan, shards) if method.order_dependent() else ()
            work = [MergeUnit(spec, u, str(stage), tuple(model_stats) if model_stats is not None else None, tied)
                    for u in todo]
            for u in units:
                if u.index in done:
                    hasher.done(u)

            def merged(unit: MergeUnit, rec: dict) -> None:
                bar.update(unit.nbytes)
                hasher.done(unit.range)

            for rec in execute(run_merge_unit, work, merged):
                done[rec["index"]] = rec
    except BaseException as exc:
        if hasher is not None:
            hasher.close()
        if isinstance(exc, MergeError) and not isinstance(exc, WorkerLost):
            shutil.rmtree(stage, ignore_errors=True)  # bad input: nothing of this plan is worth resuming
        raise  # interrupted (a signal, a lost worker): the finished units stay staged for the rerun

    diag = gather_diagnostics(labels, plan, [done[u.index] for u in units])
    assert hasher is not None
    shard_hashes = hasher.result()
    if (text := index_text(shards)) is not None:
        (stage / "model.safetensors.index.json").write_text(text)
        shard_hashes["model.safetensors.index.json"] = sha256_file(stage / "model.safetensors.index.json")
    staging.finish(stage)
    hashes.wait()
    if computed and options.use_cache:
        store_statistics(inputs, computed, device)
    report = report_of(recipe, inputs, diag, model_stats)
    write_side_files(stage, recipe, inputs, report, recipe_text)
    provenance = provenance_of(stage, recipe, inputs, shard_hashes, device)
    (stage / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    publish(stage, out, options.overwrite)
    if log:
        log(f"merged {len(labels)} model(s) with {recipe.merge_method} into {out}")
    return MergeResult(out, plan, report, provenance)
