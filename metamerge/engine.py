"""The merge: one plain loop over tensor names, streaming from the inputs to output shards.

Memory holds the base and one tensor per fine-tune at a time, never a model. Order of work:
resolve and pin every input, check headers and plan the output (no tensor read yet), run the norm
pass if the method needs whole-model norms, then merge tensor by tensor into a temporary directory
that is renamed into place only when everything, report and provenance included, is written.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, cache, staging
from .atomic import out_lock, publish
from .checks import Plan, TensorSource, plan_merge
from .device import resolve_device
from .diagnostics import Diagnostics
from .errors import MergeError
from .executors import ExecutorConfig, WorkerLost, run_units
from .io import ModelReader, parse_size
from .io.untrusted import own_file
from .io.writer import index_text, shard_layout, shard_prefix
from .loading import DTYPES, open_reader
from .methods import get_method
from .methods.base import MergeMethod
from .modelcard import render_model_card
from .norms import task_vector_statistics
from .progress import progress_bar
from .recipe import Recipe
from .refs import BackgroundHashes, ModelRef, ResolvedModel, model_files, resolve, sha256_file, with_base
from .report import REPORT_FILE, MergeReport
from .slices import plan_slices, slices_of
from .units import MergeSpec, MergeUnit, NormUnit, run_merge_unit, run_norm_unit, statistic_total

TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json",
                   "chat_template*")
UNIT_BYTES = 256 << 20  # a merge unit: enough work to hide its overhead, small enough to spread
NORM_UNIT_BYTES = 512 << 20  # a norm unit: this many bytes of the base (and as many per fine-tune)
REPORT = REPORT_FILE
PROVENANCE = "provenance.json"
RECIPE_FILE = "merge_recipe.yaml"


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


def compute_statistics(inputs: Inputs, indices: list[int], device: torch.device,
                       progress: bool = True) -> list[dict[str, float]]:
    """The method's statistic pass for the entries ``indices`` (MetaGPT: squared norms of each
    sparsified task vector), per tensor, one dict per entry, in this process."""
    names = _statistic_names(inputs)
    assert inputs.base_reader is not None, "a model statistic is of task vectors: the method needs a base"
    total = sum(inputs.base_reader.tensors[n].nbytes for n in names) * (1 + len(indices))
    with _bar(total, inputs.method.model_statistic or "statistics", progress) as bar:
        return task_vector_statistics(inputs.method, indices, inputs.base_reader,
                                      [inputs.readers[i] for i in indices], names,
                                      device=device, cast_dtype=inputs.cast_dtype,
                                      shared_rows=inputs.plan.shared_rows, progress=bar.update)


def fine_tune_statistics(inputs: Inputs, index: int, device: torch.device) -> tuple[dict[str, float], bool]:
    """Entry ``index``'s statistic per tensor, and whether it came from the cache: the one norm
    cache, shared by ``metamerge merge`` and the pipeline (keyed by content, :mod:`metamerge.cache`)."""
    found, keys = _cached_statistics(inputs, device)
    if index in found:
        return found[index], True
    (values,) = compute_statistics(inputs, [index], device, progress=False)
    if index in keys:
        cache.store_statistics(keys[index], values, {"base": inputs.base.ref if inputs.base else None,
                                                     "model": inputs.models[index].ref})
    return values, False


def _statistic_names(inputs: Inputs) -> list[str]:
    return [n for n in inputs.plan.names if n not in inputs.plan.aliases]


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

    spec = MergeSpec(key=plan_key(recipe, inputs, options, device), run=uuid.uuid4().hex, recipe=recipe, resolved=dict(inputs.resolved),
                     device=device.type, allow_pickle=options.allow_pickle)
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


def unit_ranges(shards, unit_bytes: int) -> list[staging.UnitRange]:
    """Cut each shard's tensors, in order, into units of about ``unit_bytes`` (never across shards;
    a larger tensor is a unit of its own). Depends on the plan only, never on the worker count."""
    units: list[staging.UnitRange] = []
    for shard in shards:
        base = len(shard_prefix(shard))
        names: list[str] = []
        start = end = base
        for name in shard.names:
            lo, hi = (base + x for x in shard.header[name]["data_offsets"])
            if names and hi - start > unit_bytes:
                units.append(staging.UnitRange(len(units), shard.filename, tuple(names), start, end))
                names, start = [], lo
            names.append(name)
            end = hi
        if names:
            units.append(staging.UnitRange(len(units), shard.filename, tuple(names), start, end))
    return units


def _tied_locations(plan: Plan, shards) -> tuple[tuple[str, str, int, int], ...]:
    """Where each tied tensor's target lies in the staged shards: (name, file, start, end)."""
    targets = set(plan.aliases.values())
    out = []
    for shard in shards:
        base = len(shard_prefix(shard))
        for name in shard.names:
            if name in targets:
                lo, hi = shard.header[name]["data_offsets"]
                out.append((name, shard.filename, base + lo, base + hi))
    return tuple(out)


def _norm_units(spec: MergeSpec, inputs: Inputs, indices: list[int]) -> list[NormUnit]:
    assert inputs.base_reader is not None
    units: list[NormUnit] = []
    group: list[str] = []
    size = 0
    for name in _statistic_names(inputs):
        group.append(name)
        size += inputs.base_reader.tensors[name].nbytes
        if size >= NORM_UNIT_BYTES:
            units.append(NormUnit(spec, len(units), tuple(indices), tuple(group), size * (1 + len(indices))))
            group, size = [], 0
    if group:
        units.append(NormUnit(spec, len(units), tuple(indices), tuple(group), size * (1 + len(indices))))
    return units


def _cached_statistics(inputs: Inputs, device: torch.device) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """Entries whose statistic the cache holds (by content: base and fine-tune hashes known without
    hashing), and the cache key of every entry whose content is known (to store the rest later)."""
    from .refs import known_model_hash

    method, base = inputs.method, inputs.base
    assert base is not None
    names = _statistic_names(inputs)

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


def _store_statistics(inputs: Inputs, computed: dict[int, dict[str, float]], device: torch.device) -> None:
    """After the inputs are hashed: remember what the norm pass computed, by content."""
    names = _statistic_names(inputs)
    assert inputs.base is not None
    for i, values in computed.items():
        model = inputs.models[i]
        key = cache.statistics_key(inputs.base.revision, model.revision, inputs.method.statistics_key(i),
                                   names, device.type)
        cache.store_statistics(key, values, {"base": inputs.base.ref, "model": model.ref})


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
                found, _ = _cached_statistics(inputs, device)
                for i in list(missing):
                    if i in found:
                        stats[method.entries[i].model] = found[i]
                        missing.remove(i)
            if missing:
                norm_todo = _norm_units(spec, inputs, missing)
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
                model_stats = [statistic_total(stats[e.model], _statistic_names(inputs)) for e in method.entries]
            tied = _tied_locations(plan, shards) if method.order_dependent() else ()
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

    diag = _diagnostics(labels, plan, [done[u.index] for u in units])
    assert hasher is not None
    shard_hashes = hasher.result()
    if (text := index_text(shards)) is not None:
        (stage / "model.safetensors.index.json").write_text(text)
        shard_hashes["model.safetensors.index.json"] = sha256_file(stage / "model.safetensors.index.json")
    staging.finish(stage)
    hashes.wait()
    if computed and options.use_cache:
        _store_statistics(inputs, computed, device)
    report = _report(recipe, inputs, diag, model_stats)
    _write_side_files(stage, recipe, inputs, report, recipe_text)
    provenance = _provenance(stage, recipe, inputs, shard_hashes, device)
    (stage / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    publish(stage, out, options.overwrite)
    if log:
        log(f"merged {len(labels)} model(s) with {recipe.merge_method} into {out}")
    return MergeResult(out, plan, report, provenance)


def _diagnostics(labels: list[str], plan: Plan, records: list[dict]) -> Diagnostics:
    """The report's per-tensor entries and whole-model sums, added in plan order whichever unit
    computed them (so the sums, and the report, do not depend on the executor)."""
    diag = Diagnostics(labels)
    for rec in records:
        for t in rec["tensors"]:
            if "tied_to" in t:
                diag.tensors[t["name"]] = {**diag.tensors[t["tied_to"]], "tied_to": t["tied_to"]}
            else:
                members = tuple(t["members"]) if t["members"] is not None else None
                diag.add(t["name"], t["gram"], t["coefficients"], members=members)
    return diag


def _report(recipe: Recipe, inputs: Inputs, diag: Diagnostics, model_stats: list[float] | None) -> MergeReport:
    method, labels = inputs.method, diag.labels
    model = diag.model_summary() if diag.has_task_vectors else {}
    whole = method.model_report(model_stats, labels)
    model.update(whole)
    if not whole:
        sums: dict[str, list[float]] = {}  # a slices recipe merges each model into some tensors only
        for t in diag.tensors.values():
            for lab, c in zip(t.get("models", labels), t.get("coefficients") or []):
                sums.setdefault(lab, []).append(c)
        if sums:
            model["coefficients_mean"] = {lab: sum(sums[lab]) / len(sums[lab]) for lab in labels if lab in sums}
    return MergeReport(
        method=recipe.merge_method, parameters=recipe.parameters, base=inputs.base.ref if inputs.base else None,
        models=labels, dtype=recipe.dtype, out_dtype=recipe.out_dtype, model=model, tensors=diag.tensors,
        granularity=method.report_fields().get("granularity"),
        # norms and cosines are of the raw task vectors (the orthogonality check); coefficients
        # are what the method used (for sparsified MetaGPT, from the sparsified vectors)
        diagnostics_of="raw task vectors" if diag.has_task_vectors else None,
    )


def _write_side_files(tmp: Path, recipe: Recipe, inputs: Inputs, report: MergeReport,
                      recipe_text: str | None) -> None:
    ref = inputs.donor[0] if inputs.donor else (inputs.base or inputs.models[0])
    config = inputs.reference.config()
    if config:
        if recipe.out_dtype or recipe.dtype:
            config["dtype"] = recipe.out_dtype or recipe.dtype
            config.pop("torch_dtype", None)
        if inputs.plan.vocab_size:
            config["vocab_size"] = inputs.plan.vocab_size
        config.update(inputs.plan.config_updates)  # slices: the output's layer count
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = ref.path / "generation_config.json"
    if own_file(ref.path, gen):  # side files: only the folder's own regular files (no link to a secret)
        shutil.copyfile(gen, tmp / gen.name)
    for pattern in TOKENIZER_GLOBS:
        for f in sorted(inputs.tokenizer.path.glob(pattern)):
            if own_file(inputs.tokenizer.path, f):
                shutil.copyfile(f, tmp / f.name)
    (tmp / RECIPE_FILE).write_text(recipe_text if recipe_text is not None else recipe.to_yaml())
    (tmp / REPORT).write_text(report.to_json())
    (tmp / "README.md").write_text(render_model_card(recipe, report, inputs))


def _provenance(tmp: Path, recipe: Recipe, inputs: Inputs, shard_hashes: dict[str, str], device) -> dict:
    outputs = dict(shard_hashes)
    for f in sorted(tmp.iterdir()):
        if f.is_file() and f.name not in outputs and f.name != PROVENANCE:
            outputs[f.name] = sha256_file(f)
    roles = ([("base", inputs.base)] if inputs.base else []) + [("model", m) for m in inputs.models]
    if all(inputs.tokenizer is not m for _, m in roles):
        roles.append(("tokenizer", inputs.tokenizer))
    if inputs.donor and all(inputs.donor[0] is not m for _, m in roles):
        roles.append(("config", inputs.donor[0]))
    import safetensors
    return {
        "recipe": recipe.model_dump(exclude_none=True),
        "recipe_sha256": recipe.sha256(),
        "inputs": [{"role": role, **m.to_dict()} for role, m in roles],
        "tokenizer_source": inputs.tokenizer.ref,
        "outputs": dict(sorted(outputs.items())),
        "versions": {"metamerge": __version__, "torch": torch.__version__.split("+")[0],
                     "safetensors": safetensors.__version__},
        "device": device.type,
        # What can still change the bytes is the device kind and the library versions above; the
        # thread and core counts are recorded to show they were different and did not matter.
        "environment": _environment(device),
    }


def _environment(device) -> dict:
    import os
    import platform

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "thread_count_changes_bytes": False}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
