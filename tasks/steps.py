"""The pipeline's steps as plain functions: what the Prefect tasks and the DVC stages both run.

No Prefect here. Each step takes the validated params and small JSON-able values (references,
pinned revisions, paths) and returns the same kind of values, never tensors. Every result that
costs real work is stored under a key made of what it depends on (revisions, file hashes, the
recipe, the code), never of paths or times, so the Prefect tasks can use the same key for their
cache and a DVC stage that reruns finds the work already done:

    <output_root>/<name>-<merge key>/          the merged model (engine output, with provenance)
    <output_root>/reports/<name>-<merge key>/  merge.json, lambdas.csv/png, eval.json/csv, metrics.json
    <output_root>/task_vectors/<key>/          tau_t as safetensors (only if materialize_task_vectors)
    <output_root>/.cache/{norms,evals}/<key>.json
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Callable

import metamerge
from metamerge.atomic import atomic_directory, write_text_atomic
from metamerge.errors import MergeError
from metamerge.refs import ResolvedModel, resolve, sha256_file

from .params import Params

Log = Callable[[str], None]
PACKAGE_ROOT = Path(metamerge.__file__).parent
# Core modules a merge's bytes cannot depend on; every other module of the core counts (a new
# engine module is then covered without anyone remembering to list it here).
_NOT_ENGINE = ("evaluate.py", "plots.py", "cli.py", "study.py", "scenario/")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# Content keys
# --------------------------------------------------------------------------------------------------


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_version(kind: str) -> str:
    """A content hash of the code a step's result depends on: ``engine`` or ``evaluate``.

    Editing the core invalidates exactly the results it could change; this module is always part of
    it since it decides how the core is called.
    """
    import torch

    if kind == "engine":
        files = [p for p in sorted(PACKAGE_ROOT.rglob("*.py"))
                 if not p.relative_to(PACKAGE_ROOT).as_posix().startswith(_NOT_ENGINE)]
    elif kind == "evaluate":
        files = [PACKAGE_ROOT / "evaluate.py"]
    else:
        raise ValueError(kind)
    h = hashlib.sha256(f"{metamerge.__version__}\0torch {torch.__version__.split('+')[0]}\0".encode())
    for p in files + [Path(__file__)]:
        name = p.relative_to(PACKAGE_ROOT).as_posix() if p.is_relative_to(PACKAGE_ROOT) else p.name
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def device_type(params: Params) -> str:
    from metamerge.engine import resolve_device

    return resolve_device(params.pipeline.device).type


def _method(params: Params):
    from metamerge.methods import get_method

    return get_method(params.recipe.merge_method)


def needs_norms(params: Params) -> bool:
    """Whether the method weighs fine-tunes by whole-model norms (MetaGPT, granularity model)."""
    return _method(params)(params.recipe).needs_model_statistics()


def fine_tunes(params: Params) -> list[str]:
    """The references that contribute a task vector (or, without a base, every merged model)."""
    cls = _method(params)
    entries = params.recipe.fine_tunes() if cls.uses_base(params.recipe) else params.recipe.models
    return [e.model for e in entries]


def input_refs(params: Params) -> list[str]:
    """Every reference the merge reads, base first, each once."""
    r = params.recipe
    refs = ([r.base_model] if _method(params).uses_base(r) else []) + fine_tunes(params)
    if r.tokenizer_source not in (None, "base", "union"):
        refs.append(r.tokenizer_source)
    return list(dict.fromkeys(refs))


def norms_key(params: Params, pins: dict[str, dict], ref: str, device: str) -> str:
    """Per (base revision, fine-tune revision, what the method says its statistic depends on,
    device, code): one fine-tune's norms."""
    r = params.recipe
    method = _method(params)(r)
    index = next(i for i, e in enumerate(method.entries) if e.model == ref)
    return "norms-" + digest({
        "base": pins[r.base_model]["revision"], "model": pins[ref]["revision"],
        **method.statistics_key(index), "device": device, "code": code_version("engine"),
    })


def merge_key(params: Params, pins: dict[str, dict], device: str | None = None) -> str:
    """The recipe, every input's pinned revision, the code and what changes output bytes."""
    return "merge-" + digest({
        "recipe": params.recipe.sha256(),
        "inputs": {ref: pins[ref]["revision"] for ref in input_refs(params)},
        "device": device or device_type(params), "max_shard_size": params.pipeline.max_shard_size,
        "code": code_version("engine"),
    })


def eval_key(params: Params, revision: str, device: str | None = None) -> str:
    sets = {t: sha256_file(Path(p)) for t, p in params.pipeline.eval_sets.items()}
    return "eval-" + digest({"model": revision, "sets": sets, "settings": params.pipeline.eval.model_dump(exclude={"lm_eval"}),
                             "device": device or device_type(params), "code": code_version("evaluate")})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "merge"


def merge_dir(params: Params, pins: dict[str, dict]) -> Path:
    """Where the flow writes this merge: ``<output_root>/<name>-<short key>``."""
    return params.output_root / f"{_slug(params.name)}-{merge_key(params, pins).removeprefix('merge-')[:12]}"


def report_dir(params: Params, model_dir: str | Path) -> Path:
    return params.output_root / "reports" / Path(model_dir).name


def _cache_file(params: Params, kind: str, key: str) -> Path:
    return params.output_root / ".cache" / kind / f"{key}.json"


def _stored(params: Params, kind: str, key: str, field: str, label: str, log: Log,
            compute: Callable[[], Any], **record: Any) -> Any:
    """The result stored under ``<output_root>/.cache/<kind>/<key>.json`` (its ``field``), or
    ``compute()``'s, then stored there with ``record`` beside it for whoever reads the cache."""
    path = _cache_file(params, kind, key)
    if (cached := read_json(path)) is not None:
        log(f"{label}: from {path.name}")
        return cached[field]
    result = compute()
    _write_json(path, {"key": key, **record, field: result})
    return result


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------
# download: pin a reference
# --------------------------------------------------------------------------------------------------


def pin(ref: str, log: Log = _quiet) -> dict:
    """Resolve one reference to a pinned revision (hub commit, or content hash of a folder).

    Hub models are fetched with ``snapshot_download`` restricted to safetensors, configs and
    tokenizer files; the token comes from ``HF_TOKEN`` and is never logged.
    """
    model = resolve(ref)
    log(f"pinned {ref} -> {model.source} {model.revision[:12]} ({len(model.files)} files)")
    return model.to_dict()


def resolved(pins: dict[str, dict]) -> dict[str, ResolvedModel]:
    return {ref: ResolvedModel(ref=d["ref"], path=Path(d["path"]), revision=d["revision"], source=d["source"],
                               files=dict(d.get("files", {}))) for ref, d in pins.items()}


# --------------------------------------------------------------------------------------------------
# extract_task_vectors and compute_norms
# --------------------------------------------------------------------------------------------------


def _one_model_recipe(params: Params, ref: str):
    """The recipe reduced to one fine-tune: its norms and task vector depend on nothing else.

    The vocabulary policy only decides the extra rows of ``extend``; the rows shared with the base,
    the only ones a task vector has, are the same under ``truncate``.
    """
    r = params.recipe
    entry = next(e for e in r.models if e.model == ref)
    policy = "truncate" if r.vocab_policy == "extend" else r.vocab_policy
    return r.model_copy(update={"models": [entry], "vocab_policy": policy, "tokenizer_source": None})


def task_vector_key(params: Params, pins: dict[str, dict], ref: str) -> str:
    """tau_t depends on the base and fine-tune revisions, the recipe's dtype and the code only."""
    return "tv-" + digest({"base": pins[params.recipe.base_model]["revision"], "model": pins[ref]["revision"],
                           "dtype": params.recipe.dtype, "code": code_version("engine")})


def task_vector_dir(params: Params, pins: dict[str, dict], ref: str) -> Path:
    return params.output_root / "task_vectors" / task_vector_key(params, pins, ref).removeprefix("tv-")[:16]


def task_vector_done(params: Params, pins: dict[str, dict], ref: str) -> bool:
    return not params.pipeline.materialize_task_vectors or \
        (task_vector_dir(params, pins, ref) / "task_vector.json").is_file()


def task_vectors(params: Params, pins: dict[str, dict], ref: str, log: Log = _quiet) -> dict:
    """tau_t = theta_t - theta_0: streamed by default (the norm pass and the merge compute it
    tensor by tensor); with ``materialize_task_vectors`` written once as float32 safetensors."""
    info = {"model": ref, "base_revision": pins[params.recipe.base_model]["revision"],
            "revision": pins[ref]["revision"], "materialized": False, "path": None,
            "key": task_vector_key(params, pins, ref)}
    if not params.pipeline.materialize_task_vectors:
        return info
    out = task_vector_dir(params, pins, ref)
    info.update(materialized=True, path=str(out))
    if (out / "task_vector.json").is_file():
        log(f"task vector of {ref}: reusing {out}")
        return info
    _write_task_vector(params, pins, ref, out, info)
    log(f"task vector of {ref}: wrote {out}")
    return info


def _write_task_vector(params: Params, pins: dict[str, dict], ref: str, out: Path, info: dict) -> None:
    import torch

    from metamerge.engine import MergeOptions, open_inputs, resolve_device
    from metamerge.io import ShardedWriter, parse_size
    from metamerge.loading import load_compute

    device = resolve_device(params.pipeline.device)
    inputs = open_inputs(_one_model_recipe(params, ref), MergeOptions(progress=False), resolved(pins))
    plan = inputs.plan
    names = [n for n in plan.names if n not in plan.aliases]
    # task vectors cover the rows shared with the base: the base's shapes
    shapes = {n: tuple(inputs.base_reader.tensors[n].shape) for n in names}
    with atomic_directory(out, overwrite=True) as tmp:
        writer = ShardedWriter(tmp, [(n, shapes[n], torch.float32) for n in names],
                               parse_size(params.pipeline.max_shard_size))
        try:
            for n in names:
                rows = plan.shared_rows.get(n)
                tau = load_compute(inputs.readers[0], n, device, inputs.cast_dtype, rows)
                tau.sub_(load_compute(inputs.base_reader, n, device, inputs.cast_dtype, rows))
                writer.write(n, tau.to(device="cpu", dtype=torch.float32))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        _write_json(tmp / "task_vector.json", {k: v for k, v in info.items() if k != "path"})


def norms(params: Params, pins: dict[str, dict], ref: str, log: Log = _quiet) -> dict[str, float]:
    """||tau_t||^2 per tensor for one fine-tune (after the method's sparsification), on the GPU
    when there is one; stored under its key, so a fine-tune's norms are computed once."""
    from metamerge.engine import MergeOptions, compute_statistics, open_inputs, resolve_device

    device = resolve_device(params.pipeline.device)

    def compute() -> dict[str, float]:
        inputs = open_inputs(_one_model_recipe(params, ref), MergeOptions(progress=False), resolved(pins))
        log(f"norms of {ref}: {len(inputs.plan.names)} tensors on {device.type}")
        (sq,) = compute_statistics(inputs, [0], device, progress=False)
        log(f"norms of {ref}: ||tau||^2 = {sum(sq.values()):.6g}")
        return sq

    return _stored(params, "norms", norms_key(params, pins, ref, device.type), "sqnorms", f"norms of {ref}", log,
                   compute, model=ref, base_revision=pins[params.recipe.base_model]["revision"],
                   revision=pins[ref]["revision"])


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------


def merge_info(model_dir: str | Path, key: str | None = None) -> dict:
    """What later steps need of a merged model: where, its content revision, its coefficients."""
    model_dir = Path(model_dir)
    prov = json.loads((model_dir / "provenance.json").read_text())
    report = json.loads((model_dir / "merge_report.json").read_text())
    model = report.get("model", {})
    return {"model_dir": str(model_dir), "key": key, "revision": digest(prov["outputs"]),
            "method": report["method"], "models": report["models"],
            "lambdas": model.get("lambdas") or model.get("coefficients_mean") or {}}


def existing_merge(params: Params, pins: dict[str, dict], model_dir: str | Path) -> dict | None:
    """The merge already in ``model_dir`` if its provenance matches these inputs, else None."""
    model_dir = Path(model_dir)
    prov = read_json(model_dir / "provenance.json")
    if not prov or prov.get("recipe_sha256") != params.recipe.sha256():
        return None
    revisions = {i["ref"]: i["revision"] for i in prov.get("inputs", [])}
    merged = ([params.recipe.base_model] if _method(params).uses_base(params.recipe) else []) + fine_tunes(params)
    if any(revisions.get(ref) != pins[ref]["revision"] for ref in merged):
        return None
    if not all((model_dir / f).is_file() for f in prov.get("outputs", {})) or \
            not (model_dir / "merge_report.json").is_file():
        return None
    return merge_info(model_dir, merge_key(params, pins))


def merge(params: Params, pins: dict[str, dict], sqnorms: dict[str, dict[str, float]] | None = None,
          out_dir: str | Path | None = None, log: Log = _quiet) -> dict:
    """The engine, fed with pinned inputs and cached norms; reuses a matching merge in place."""
    from metamerge.engine import MergeOptions
    from metamerge.engine import merge as engine_merge

    out = Path(out_dir) if out_dir is not None else merge_dir(params, pins)
    key = merge_key(params, pins)
    if (info := existing_merge(params, pins, out)) is not None:
        log(f"merge: {out} already holds this merge (provenance matches); reusing it")
        return info
    options = MergeOptions(device=params.pipeline.device, overwrite=True, progress=False,
                           max_shard_size=params.pipeline.max_shard_size)
    log(f"merge: {params.recipe.merge_method} of {len(fine_tunes(params))} model(s) into {out}")
    engine_merge(params.recipe, out, options, stats=sqnorms or None, resolved=resolved(pins),
                 recipe_text=params.recipe_text(), log=log)
    return merge_info(out, key)


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------


def evaluate(params: Params, model_dir: str | Path, revision: str, log: Log = _quiet) -> dict[str, dict]:
    """Scores of one model on every eval set, ``{task: TaskScores.to_dict()}``, stored by revision."""
    from metamerge.evaluate import evaluate_model

    if not params.pipeline.eval_sets:
        return {}

    def compute() -> dict[str, dict]:
        e = params.pipeline.eval
        log(f"evaluate {Path(model_dir).name} on {', '.join(params.pipeline.eval_sets)}")
        scores = evaluate_model(model_dir, params.pipeline.eval_sets, device=params.pipeline.device,
                                batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                with_exact_match=e.exact_match, progress=False)
        for t, s in scores.items():
            em = "-" if s.exact_match is None else f"{s.exact_match:.3f}"
            log(f"  {t}: loss {s.loss:.4f}, exact match {em}")
        return {t: s.to_dict() for t, s in scores.items()}

    return _stored(params, "evals", eval_key(params, revision), "scores", f"evaluate {Path(model_dir).name}", log,
                   compute, model=str(model_dir), revision=revision)


def benchmark_key(params: Params, revision: str) -> str:
    """What a benchmark result depends on: the model's content, the harness settings, the device."""
    cfg = params.pipeline.eval.lm_eval
    return "lm-eval-" + digest({"model": revision, "settings": cfg.model_dump() if cfg else None,
                                "device": device_type(params)})


def benchmark(params: Params, model_dir: str | Path, revision: str, log: Log = _quiet) -> dict[str, dict]:
    """lm-evaluation-harness results ``{benchmark: {metric: value}}`` of one model, stored by revision.

    Only when ``pipeline.eval.lm_eval`` names benchmarks (the harness is the user's to install, and
    its datasets to have); ``{}`` otherwise.
    """
    from metamerge.evaluate import run_lm_eval

    cfg = params.pipeline.eval.lm_eval
    if cfg is None:
        return {}

    def compute() -> dict[str, dict]:
        log(f"lm-eval {Path(model_dir).name} on {', '.join(cfg.tasks)}")
        limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
        results = run_lm_eval(model_dir, cfg.tasks, device=params.pipeline.device, batch_size=cfg.batch_size,
                              num_fewshot=cfg.num_fewshot, limit=limit)
        return json.loads(json.dumps(results, default=str))  # the harness mixes in non-JSON values

    return _stored(params, "lm_eval", benchmark_key(params, revision), "results", f"lm-eval {Path(model_dir).name}",
                   log, compute, model=str(model_dir), revision=revision)


def models_to_score(params: Params, pins: dict[str, dict]) -> dict[str, str]:
    """Name -> reference of the inputs scored beside the merge: the base and each task's expert."""
    out = {}
    if params.recipe.base_model and params.recipe.base_model in pins:
        out["base"] = params.recipe.base_model
    for ref in params.pipeline.experts.values():
        out[ref] = ref
    return out


def summarize(params: Params, scores: dict[str, dict[str, dict]], benchmarks: dict | None = None) -> dict:
    """The evaluation summary (``eval.json``): scores per model and, with experts, MetaGPT's objective;
    ``lm_eval``: the merged model's benchmark results, when there are any."""
    summary = _summarize_scores(params, scores)
    if benchmarks:
        summary["lm_eval"] = benchmarks
    return summary


def _summarize_scores(params: Params, scores: dict[str, dict[str, dict]]) -> dict:
    from metamerge.evaluate import TaskScores
    from metamerge.evaluate import summarize as core_summarize

    objs = {name: {t: TaskScores.from_dict(d) for t, d in per.items()} for name, per in scores.items() if per}
    if not objs:
        return {}
    base = "base" if "base" in objs else None
    if params.pipeline.experts:
        return core_summarize(objs, merged="merged", expert_of=dict(params.pipeline.experts), base=base)
    return {"merged": "merged", "base": base, "tasks": list(objs["merged"]), "expert_of": {}, "objective": {},
            "scores": {name: {t: s.to_dict() for t, s in per.items()} for name, per in objs.items()}}


# --------------------------------------------------------------------------------------------------
# reports: the files DVC tracks as metrics and plots, and the flow's artifact
# --------------------------------------------------------------------------------------------------


def tensor_coefficients(model_dir: str | Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(models, {tensor: {model: coefficient}}) from the merge report, in tensor order."""
    report = json.loads((Path(model_dir) / "merge_report.json").read_text())
    labels = report["models"]
    table = {}
    for name, t in report["tensors"].items():
        if t.get("coefficients"):
            table[name] = dict(zip(labels, t["coefficients"]))
    return labels, table


def layer_coefficients(model_dir: str | Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Mean coefficient per layer (tensors outside the layer stack grouped as ``other``)."""
    labels, table = tensor_coefficients(model_dir)
    groups: dict[str, list[dict[str, float]]] = {}
    for name, row in table.items():
        m = _LAYER.search(name)
        groups.setdefault(f"layer {int(m.group(1))}" if m else "other", []).append(row)
    order = sorted(groups, key=lambda g: (g == "other", int(g.split()[1]) if g != "other" else 0))
    return labels, {g: {lab: sum(r[lab] for r in groups[g]) / len(groups[g]) for lab in labels} for g in order}


def write_merge_report(info: dict, out_dir: str | Path) -> dict[str, str]:
    """merge.json (metrics: lambdas, norms, cosine), lambdas.csv and the lambda/cosine plots."""
    from metamerge.plots import plot_cosine_heatmap, plot_lambdas

    out = Path(out_dir)
    report = json.loads((Path(info["model_dir"]) / "merge_report.json").read_text())
    model = report.get("model", {})
    files = {"merge": _write_json(out / "merge.json", {
        "method": report["method"], "granularity": report.get("granularity"), "models": report["models"],
        "lambdas": info["lambdas"], "norms": model.get("norms"), "cosine": model.get("cosine"),
        "revision": info["revision"]})}
    labels, table = tensor_coefficients(info["model_dir"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "tensor", *labels])
    for i, (name, row) in enumerate(table.items()):
        w.writerow([i, name, *(row[lab] for lab in labels)])
    files["lambdas_csv"] = write_text_atomic(out / "lambdas.csv", buf.getvalue())
    if table:
        files["lambdas_png"] = plot_lambdas(table, out / "lambdas.png", title=f"{report['method']} coefficient per tensor")
    if model.get("cosine") and len(labels) > 1:
        files["cosine_png"] = plot_cosine_heatmap(model["cosine"], labels, out / "cosine.png")
    return {k: str(v) for k, v in files.items()}


def write_eval_report(summary: dict, out_dir: str | Path) -> dict[str, str]:
    """eval.json/eval.csv (the summary), metrics.json (small, for ``dvc metrics``), scores.png."""
    from metamerge.evaluate import score_table, write_eval_outputs
    from metamerge.plots import plot_scores

    out = Path(out_dir)
    if not summary.get("scores"):  # no eval sets: benchmark results at most
        files = {"metrics": str(_write_json(out / "metrics.json", {}))}
        if summary:
            files["json"] = str(_write_json(out / "eval.json", summary))
        return files
    files = {k: str(v) for k, v in write_eval_outputs(out, summary).items()}
    merged = summary["scores"][summary["merged"]]
    metrics = {"merged": {t: {"loss": s["loss"], "exact_match": s.get("exact_match")} for t, s in merged.items()}}
    for k in ("average_loss_difference", "average_normalized_exact_match"):
        if k in summary:
            metrics[k] = summary[k]
    files["metrics"] = str(_write_json(out / "metrics.json", metrics))
    metric = "exact_match" if any(s.get("exact_match") is not None for s in merged.values()) else "loss"
    files["scores_png"] = str(plot_scores(score_table(summary, metric), out / "scores.png", ylabel=metric,
                                          title=f"{metric} per task"))
    return files


def report_done(out_dir: str | Path, with_eval: bool) -> bool:
    names = ["merge.json", "lambdas.csv"] + (["eval.json", "metrics.json"] if with_eval else [])
    return all((Path(out_dir) / n).is_file() for n in names)


def render_markdown(params: Params, info: dict, summary: dict) -> str:
    """The flow's artifact: the merged model, its lambdas per layer and the per-task scores."""
    labels, layers = layer_coefficients(info["model_dir"])
    lines = [f"# Merge `{params.name}`", "", f"Method `{info['method']}`, output `{info['model_dir']}`", "",
             "## Lambdas per layer", "", "| layer | " + " | ".join(f"`{lab}`" for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for g, row in layers.items():
        lines.append(f"| {g} | " + " | ".join(f"{row[lab]:.4f}" for lab in labels) + " |")
    if summary:
        tasks = summary["tasks"]
        lines += ["", "## Scores per task (exact match / loss)", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, per in summary["scores"].items():
            cells = []
            for t in tasks:
                s = per.get(t, {})
                em = "-" if s.get("exact_match") is None else f"{s['exact_match']:.3f}"
                cells.append(f"{em} / {s['loss']:.3f}" if s else "-")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        if summary.get("average_loss_difference") is not None:
            lines += ["", f"Average loss difference (MetaGPT's objective): {summary['average_loss_difference']:.4f}"]
    return "\n".join(lines) + "\n"


def score_rows(summary: dict) -> list[dict]:
    """Rows for a table artifact: one per (model, task)."""
    return [{"model": name, "task": t, "loss": s.get("loss"), "exact_match": s.get("exact_match")}
            for name, per in summary.get("scores", {}).items() for t, s in per.items()]


# --------------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------------


REGISTER_ENTRY_POINT = ("modelregistry", "register_merged")


def registry_entry_point() -> tuple[Callable | None, str]:
    """The registry's registration function, or None and why not (the module is optional)."""
    import importlib

    module, name = REGISTER_ENTRY_POINT
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return None, f"{module}.{name} is not available ({exc})"
    return fn, ""


def register(params: Params, info: dict, summary: dict, log: Log = _quiet, *,
             lineage: dict | None = None, extra_artifacts: list[str] = ()) -> dict:
    """Register the merged model through ``modelregistry`` (MLflow; the promotion gate lives there).

    ``lineage`` (e.g. the Prefect flow run id, the DVC lock file) and ``extra_artifacts`` (the
    report files) go into the MLflow run beside the model.
    """
    from .params import registry_config

    config = registry_config(params.pipeline, params.source)
    if config is None:
        log("register: pipeline.registry is not set; skipped")
        return {"registered": False, "reason": "pipeline.registry is not set"}
    fn, why = registry_entry_point()
    if fn is None:
        log(f"register: {why}; skipped")
        return {"registered": False, "reason": why}
    log(f"register: {info['model_dir']} as a new version of '{config.model_name}' ({config.tracking_uri})")
    result = dict(fn(info["model_dir"], summary=summary, config=config, lineage=dict(lineage or {}),
                     extra_artifacts=[str(a) for a in extra_artifacts]))
    decision = result.get("decision") or {}
    log(f"register: version {result.get('version')}: {decision.get('decision')} ({decision.get('reason', '')})")
    return {"registered": True, **result}


_PERMANENT = {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "DisabledRepoError",
              "RemoteEntryNotFoundError", "BadRequestError", "OfflineModeIsEnabled"}
_NOT_TRANSIENT_OS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed download is worth retrying: a network or I/O error, not a bad reference.

    A missing repository or revision, a gated repo, offline mode or a content-hash mismatch fail at
    once; a dropped connection, a timeout, a 5xx/429 answer or an I/O error while reading are
    retried. The whole exception chain is looked at, since the core turns hub errors into one-line
    ``MergeError`` messages.
    """
    chain, seen, stack = [], set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        stack += [e.__cause__, e.__context__]
    if {c.__name__ for e in chain for c in type(e).__mro__} & _PERMANENT:
        return False
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status >= 500 or status in (408, 429)
    for e in chain:
        names = {c.__name__ for c in type(e).__mro__ if c.__module__.startswith(("httpx", "requests", "urllib3"))}
        if names & {"TransportError", "TimeoutException", "ConnectionError", "Timeout", "ProtocolError"}:
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and not isinstance(e, _NOT_TRANSIENT_OS):
            return True
    return False


def check_inputs(params: Params) -> None:
    """Fail before any work if the recipe names a local folder that is not there."""
    from metamerge.refs import ModelRef

    for ref in input_refs(params):
        m = ModelRef.parse(ref)
        if m.is_local() and not Path(m.name).expanduser().is_dir():
            raise MergeError(f"{params.source}: model '{ref}': no such directory {Path(m.name).absolute()}")


# --------------------------------------------------------------------------------------------------
# watch
# --------------------------------------------------------------------------------------------------


def _local_path(ref: str) -> Path | None:
    from metamerge.refs import ModelRef

    m = ModelRef.parse(ref)
    return Path(m.name).expanduser().absolute() if m.is_local() else None


def watched_additions(params: Params) -> list[dict]:
    """Fine-tunes the watch list adds to the recipe: watched references not in it yet, and every
    model folder (one with a config.json; hidden folders are skipped, as half-copied ones should
    be named) under a watched directory."""
    r = params.recipe
    known = {m.model for m in r.models} | {r.base_model}
    known_paths = {p for p in map(_local_path, filter(None, known)) if p is not None}
    out: list[dict] = []

    def add(ref: str, parameters: dict) -> None:
        path = _local_path(ref)
        if ref in known or (path is not None and path in known_paths):
            return
        known.add(ref)
        if path is not None:
            known_paths.add(path)
        out.append({"model": ref, "parameters": dict(parameters)} if parameters else {"model": ref})

    for w in params.pipeline.watch_entries():
        if hasattr(w, "ref"):
            add(w.ref, w.parameters)
            continue
        folder = Path(w.dir).expanduser()
        if not folder.is_dir():
            raise MergeError(f"{params.source}: watched folder {folder.absolute()} does not exist")
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and (sub / "config.json").is_file():
                add(str(Path(w.dir) / sub.name), w.parameters)
    return out
