"""The merge: one plain loop over tensor names, streaming from the inputs to output shards.

Memory holds the base and one tensor per fine-tune at a time, never a model. Order of work:
resolve and pin every input, check headers and plan the output (no tensor read yet), run the norm
pass if the method needs whole-model norms, then merge tensor by tensor into a temporary directory
that is renamed into place only when everything, report and provenance included, is written.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_directory, out_lock
from .checks import Plan, TensorSource, plan_merge
from .device import resolve_device
from .diagnostics import Diagnostics, gram
from .errors import MergeError
from .io import ModelReader, ShardedWriter, parse_size
from .io.untrusted import own_file
from .loading import DTYPES, Workspace, load_compute, name_nonfinite, open_reader
from .methods import TensorJob, get_method
from .methods.base import MergeMethod, MergeOutput
from .modelcard import render_model_card
from .norms import task_vector_statistics
from .progress import progress_bar
from .recipe import Recipe
from .refs import BackgroundHashes, ModelRef, ResolvedModel, resolve, sha256_file, with_base
from .report import REPORT_FILE, MergeReport
from .slices import plan_slices, slices_of

TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json",
                   "chat_template*")
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
        return _open_slices(recipe, options, pin, method_cls)
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
    return Inputs(method, base, models, tokenizer, readers, base_reader, plan, cast)


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
    sparsified task vector), per tensor, one dict per entry (the unit the pipeline caches)."""
    names = [n for n in inputs.plan.names if n not in inputs.plan.aliases]
    assert inputs.base_reader is not None, "a model statistic is of task vectors: the method needs a base"
    total = sum(inputs.base_reader.tensors[n].nbytes for n in names) * (1 + len(indices))
    with _bar(total, inputs.method.model_statistic or "statistics", progress) as bar:
        return task_vector_statistics(inputs.method, indices, inputs.base_reader,
                                   [inputs.readers[i] for i in indices], names,
                                   device=device, cast_dtype=inputs.cast_dtype,
                                   shared_rows=inputs.plan.shared_rows, progress=bar.update)


def merge(recipe: Recipe, out_dir: str | Path | None, options: MergeOptions | None = None, *,
          stats: dict[str, dict[str, float]] | None = None,
          resolved: dict[str, ResolvedModel] | None = None,
          recipe_text: str | None = None, dry_run: bool = False,
          log: Callable[[str], None] | None = None) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir`` (atomically).

    ``stats`` (reference -> tensor -> the method's statistic, e.g. MetaGPT's ||tau||^2) and
    ``resolved`` (reference -> pinned model) let the pipeline pass in what it has cached; anything
    missing is computed here.
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

    # Local inputs are hashed on a thread while the merge runs (sha256 releases the GIL).
    pinned = [inputs.base, *inputs.models, inputs.tokenizer] + ([inputs.donor[0]] if inputs.donor else [])
    _refuse_out_over_input(out_dir, [m for m in pinned if m is not None])
    with out_lock(out_dir, wait=options.wait):  # one writer per OUT, from here to the final rename
        if Path(out_dir).exists() and not options.overwrite:  # finished by the writer we waited for
            raise MergeError(f"{Path(out_dir).absolute()} already exists; choose another output directory "
                             "or pass --overwrite")
        with BackgroundHashes(pinned if options.hash_inputs else []) as hashes:
            return _merge_into(recipe, out_dir, options, inputs, device, stats, recipe_text, log, hashes)


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


def _merge_into(recipe: Recipe, out_dir, options: MergeOptions, inputs: Inputs, device: torch.device,
                stats, recipe_text: str | None, log, hashes: BackgroundHashes) -> MergeResult:
    plan, method = inputs.plan, inputs.method
    labels = [m.ref for m in inputs.models]
    model_stats = None
    if method.needs_model_statistics():
        stats = dict(stats or {})
        missing = [i for i, e in enumerate(method.entries) if e.model not in stats]
        if missing:
            for i, st in zip(missing, compute_statistics(inputs, missing, device, options.progress)):
                stats[method.entries[i].model] = st
        # summed exactly (fsum): the same whatever order the tensors' statistics arrived in
        model_stats = [math.fsum(stats[e.model][n] for n in plan.names if n not in plan.aliases)
                       for e in method.entries]

    diag = Diagnostics(labels)
    _check_free_space(Path(out_dir), plan.total_bytes)
    with atomic_directory(out_dir, overwrite=options.overwrite) as tmp:
        writer = ShardedWriter(tmp, [(n, plan.out_shapes[n], plan.out_dtypes[n]) for n in plan.names],
                               parse_size(options.max_shard_size))
        try:
            _merge_tensors(inputs, method, writer, diag, device, model_stats, options.progress)
        except BaseException:
            writer.abort()
            raise
        shard_hashes = writer.close()
        hashes.wait()
        report = _report(recipe, inputs, diag, model_stats)
        _write_side_files(tmp, recipe, inputs, report, recipe_text)
        provenance = _provenance(tmp, recipe, inputs, shard_hashes, device)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    if log:
        log(f"merged {len(labels)} model(s) with {recipe.merge_method} into {out_dir}")
    return MergeResult(Path(out_dir), plan, report, provenance)


def _merge_tensors(inputs: Inputs, method: MergeMethod, writer: ShardedWriter, diag: Diagnostics,
                   device: torch.device, model_stats: list[float] | None, progress: bool) -> None:
    plan, pool = inputs.plan, inputs.pool
    ws = Workspace(device)
    written: dict[str, torch.Tensor] = {}
    targets = set(plan.aliases.values())
    with _bar(plan.total_bytes, "merge", progress) as bar:
        for name in plan.names:
            if name in plan.aliases:  # tied to a tensor merged just before it: stays tied
                writer.write(name, written.pop(plan.aliases[name]))
                diag.tensors[name] = {**diag.tensors[plan.aliases[name]], "tied_to": plan.aliases[name]}
                continue
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
            writer.write(name, result)
            if name in targets:
                written[name] = result.clone()
            diag.add(name, g, out.coefficients, members=src.members if plan.sources else None)
            bar.update(result.numel() * result.element_size())


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
