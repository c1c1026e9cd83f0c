"""The pipeline's steps: pin the inputs, task vectors, norms, merge, evaluate, benchmark.

Each step takes the validated params and small JSON-able values (references, pinned revisions,
paths) and returns the same kind of values, never tensors. The steps compute; they keep no cache
of their own. What reruns is decided by Prefect's cache (the tasks' policy over ``keys``) or DVC's
(the stages' exact deps); a step's output folder is named by its content key (``store``) and a
complete one is reused in place. The norms are the exception that proves the rule: they live in
the merge core's one cache (``METAMERGE_CACHE_DIR``), which ``metamerge merge`` shares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metamerge.atomic import atomic_directory
from metamerge.errors import InputError
from metamerge.refs import ModelRef, ResolvedModel, resolve
from metamerge.report import MergeReport

from .keys import (
    digest,
    fine_tunes,
    input_refs,
    merge_key,
    merged_refs,
    task_vector_key,
)
from .params import Params
from .store import Log, merge_dir, quiet, read_json, task_vector_dir, write_json

# --------------------------------------------------------------------------------------------------
# download: pin a reference
# --------------------------------------------------------------------------------------------------


def check_inputs(params: Params) -> None:
    """Fail before any work if the recipe names a local folder that is not there."""
    for ref in input_refs(params):
        for part in ref.split("+"):  # BASE+ADAPTER: both parts
            m = ModelRef.parse(part)
            if m.is_local() and not Path(m.name).expanduser().is_dir():
                raise InputError(f"{params.source}: model '{ref}': no such directory {Path(m.name).absolute()}")


def tokenizer_source(params: Params) -> str | None:
    """The input whose tokenizer the merged model gets (the engine copies it): ``tokenizer_source``
    when it names a model, else the base, else the first model (a slices recipe's donor)."""
    r = params.recipe
    if r.tokenizer_source not in (None, "base", "union"):
        return r.tokenizer_source
    if r.base_model:
        return r.base_model
    if r.slices:
        return r.slices[0].sources[0].model
    return r.models[0].model if r.models else None


def check_tokenizers(params: Params, pins: dict[str, dict]) -> None:
    """Before any merge work, when the pipeline evaluates: every folder evaluation will load a
    tokenizer from (the merged model's tokenizer source, the base, each expert) has tokenizer
    files; else one line naming the model and the missing files."""
    from evaluation.tokenizers import missing_tokenizer_files

    if not params.pipeline.eval_sets and params.pipeline.eval.lm_eval is None:
        return
    needed = {ref: "the merged model's tokenizer source" for ref in [tokenizer_source(params)] if ref}
    for name, ref in models_to_score(params, pins).items():
        needed.setdefault(ref, "the base (evaluated beside the merge)" if name == "base" else "an expert (evaluated)")
    for ref, role in needed.items():
        path = Path(pins[ref]["path"]) if ref in pins else Path(ModelRef.parse(ref).name).expanduser()
        missing = missing_tokenizer_files(path)
        if missing:
            raise InputError(f"{params.source}: model '{ref}' ({role}) has no tokenizer in {path} ({missing}); "
                             "evaluation loads it after the merge: add the tokenizer files, or set "
                             "recipe.tokenizer_source / pipeline.experts to a model that has them")


def pin(ref: str, log: Log = quiet) -> dict:
    """Resolve one reference to a pinned revision (hub commit, or content hash of a folder).

    Hub models are fetched with ``snapshot_download`` restricted to safetensors, configs and
    tokenizer files; the token comes from ``HF_TOKEN`` and is never logged.
    """
    model = resolve(ref)
    log(f"pinned {ref} -> {model.source} {model.revision[:12]} ({len(model.files)} files)")
    return model.to_dict()


def resolved(pins: dict[str, dict]) -> dict[str, ResolvedModel]:
    return {ref: ResolvedModel.from_dict(d) for ref, d in pins.items()}


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


def task_vector_done(params: Params, pins: dict[str, dict], ref: str) -> bool:
    return not params.pipeline.materialize_task_vectors or \
        (task_vector_dir(params, pins, ref) / "task_vector.json").is_file()


def task_vectors(params: Params, pins: dict[str, dict], ref: str, log: Log = quiet) -> dict:
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

    from metamerge.device import resolve_device
    from metamerge.engine import MergeOptions, open_inputs
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
        write_json(tmp / "task_vector.json", {k: v for k, v in info.items() if k != "path"})


def norms(params: Params, pins: dict[str, dict], ref: str, log: Log = quiet) -> dict[str, float]:
    """||tau_t||^2 per tensor for one fine-tune (after the method's sparsification), on the GPU
    when there is one; from the merge core's one cache (``METAMERGE_CACHE_DIR``, keyed by the base's
    and the fine-tune's content), which ``metamerge merge`` reads and fills too."""
    from metamerge.device import resolve_device
    from metamerge.engine import MergeOptions, open_inputs
    from metamerge.statistics import fine_tune_statistics

    device = resolve_device(params.pipeline.device)
    inputs = open_inputs(_one_model_recipe(params, ref), MergeOptions(progress=False), resolved(pins))
    sq, cached = fine_tune_statistics(inputs, 0, device)
    if cached:
        log(f"norms of {ref}: from the cache (METAMERGE_CACHE_DIR)")
    else:
        log(f"norms of {ref}: {len(inputs.plan.names)} tensors on {device.type}")
        log(f"norms of {ref}: ||tau||^2 = {sum(sq.values()):.6g}")
    return sq


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------


def merge_info(model_dir: str | Path, key: str | None = None) -> dict:
    """What later steps need of a merged model: where, its content revision, its coefficients."""
    model_dir = Path(model_dir)
    prov = json.loads((model_dir / "provenance.json").read_text())
    report = MergeReport.load(model_dir)
    return {"model_dir": str(model_dir), "key": key, "revision": digest(prov["outputs"]),
            "method": report.method, "models": report.models, "lambdas": report.coefficients}


def existing_merge(params: Params, pins: dict[str, dict], model_dir: str | Path) -> dict | None:
    """The merge already in ``model_dir`` if its provenance matches these inputs, else None."""
    model_dir = Path(model_dir)
    prov = read_json(model_dir / "provenance.json")
    if not prov or prov.get("recipe_sha256") != params.recipe.sha256():
        return None
    revisions = {i["ref"]: i["revision"] for i in prov.get("inputs", [])}
    if any(revisions.get(ref) != pins[ref]["revision"] for ref in merged_refs(params)):
        return None
    if not all((model_dir / f).is_file() for f in prov.get("outputs", {})) or \
            not (model_dir / "merge_report.json").is_file():
        return None
    return merge_info(model_dir, merge_key(params, pins))


def merge(params: Params, pins: dict[str, dict], sqnorms: dict[str, dict[str, float]] | None = None,
          out_dir: str | Path | None = None, log: Log = quiet, runner=None) -> dict:
    """The engine, fed with pinned inputs and cached norms; reuses a matching merge in place.
    ``runner``: who runs the merge's units (the Prefect layer passes one for ``executor.kind:
    dask``); else the engine's local worker processes per ``pipeline.executor``."""
    from metamerge.engine import MergeOptions
    from metamerge.engine import merge as engine_merge
    from metamerge.executors import ExecutorConfig
    from metamerge.io import parse_size

    out = Path(out_dir) if out_dir is not None else merge_dir(params, pins)
    key = merge_key(params, pins)
    if (info := existing_merge(params, pins, out)) is not None:
        log(f"merge: {out} already holds this merge (provenance matches); reusing it")
        return info
    ex = params.pipeline.executor
    options = MergeOptions(device=params.pipeline.device, overwrite=True, progress=False,
                           max_shard_size=params.pipeline.max_shard_size, unit_bytes=parse_size(ex.unit_size),
                           executor=ExecutorConfig(kind=ex.kind, n_workers=ex.n_workers, address=ex.address,
                                                   threads_per_worker=ex.threads_per_worker),
                           runner=runner)
    if params.pipeline.output == "adapter":  # one PEFT LoRA adapter (metamerge merge --as-adapter)
        from metamerge.adapter_out import merge_to_adapter

        log(f"merge: {params.recipe.merge_method} of {len(fine_tunes(params))} adapter(s) into one adapter, {out}")
        merge_to_adapter(params.recipe, out, options, recipe_text=params.recipe_text(), resolved=resolved(pins),
                         rank=params.pipeline.adapter_rank)
        return merge_info(out, key)
    log(f"merge: {params.recipe.merge_method} of {len(fine_tunes(params))} model(s) into {out}")
    engine_merge(params.recipe, out, options, stats=sqnorms or None, resolved=resolved(pins),
                 recipe_text=params.recipe_text(), log=log)
    return merge_info(out, key)


# --------------------------------------------------------------------------------------------------
# evaluate and benchmark
# --------------------------------------------------------------------------------------------------


def evaluate(params: Params, model_dir: str | Path, revision: str, log: Log = quiet) -> dict[str, dict]:
    """Scores of one model on every eval set, ``{task: TaskScores.to_dict()}``. ``revision`` (the
    model's content) is what the callers' caches key it by (``keys.eval_key``)."""
    from evaluation import evaluate_model

    if not params.pipeline.eval_sets:
        return {}
    e = params.pipeline.eval
    log(f"evaluate {Path(model_dir).name} on {', '.join(params.pipeline.eval_sets)}")
    scores = evaluate_model(model_dir, params.pipeline.eval_sets, device=params.pipeline.device,
                            batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                            with_exact_match=e.exact_match, progress=False, base_dir=adapter_base(params, model_dir))
    for t, s in scores.items():
        em = "-" if s.exact_match is None else f"{s.exact_match:.3f}"
        log(f"  {t}: loss {s.loss:.4f}, exact match {em}")
    return {t: s.to_dict() for t, s in scores.items()}


def adapter_base(params: Params, model_dir: str | Path) -> str | None:
    """Where a LoRA adapter being evaluated finds its base: for an expert given as ``BASE+ADAPTER``,
    that BASE; else the recipe's base when it is a plain local folder; else (None) the adapter's
    own config names it."""
    def local(ref: str) -> Path | None:
        p = Path(ref).expanduser()
        return p if "@" not in ref and p.is_dir() else None

    target = Path(model_dir).expanduser().resolve()
    for ref in input_refs(params):
        base, plus, adapter = ref.partition("+")
        if plus and (a := local(adapter)) is not None and a.resolve() == target and (b := local(base)) is not None:
            return str(b)
    base_model = params.recipe.base_model
    if base_model and "+" not in base_model and (b := local(base_model)) is not None:
        return str(b)
    return None


def benchmark(params: Params, model_dir: str | Path, revision: str, log: Log = quiet) -> dict[str, dict]:
    """lm-evaluation-harness results ``{benchmark: {metric: value}}`` of one model (keyed by the
    callers' caches by ``revision``: ``keys.benchmark_key``).

    Only when ``pipeline.eval.lm_eval`` names benchmarks (the harness is the user's to install, and
    its datasets to have); ``{}`` otherwise.
    """
    from evaluation import run_lm_eval

    cfg = params.pipeline.eval.lm_eval
    if cfg is None:
        return {}
    log(f"lm-eval {Path(model_dir).name} on {', '.join(cfg.tasks)}")
    limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
    results = run_lm_eval(model_dir, cfg.tasks, device=params.pipeline.device, batch_size=cfg.batch_size,
                          num_fewshot=cfg.num_fewshot, limit=limit)
    return json.loads(json.dumps(results, default=str))  # the harness mixes in non-JSON values


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


def _summarize_scores(params: Params, scores: dict[str, dict[str, dict]]) -> dict[str, Any]:
    from evaluation import TaskScores
    from evaluation import summarize as summarize_scores

    objs = {name: {t: TaskScores.from_dict(d) for t, d in per.items()} for name, per in scores.items() if per}
    if not objs:
        return {}
    base = "base" if "base" in objs else None
    if params.pipeline.experts:
        return summarize_scores(objs, merged="merged", expert_of=dict(params.pipeline.experts), base=base)
    return {"merged": "merged", "base": base, "tasks": list(objs["merged"]), "expert_of": {}, "objective": {},
            "scores": {name: {t: s.to_dict() for t, s in per.items()} for name, per in objs.items()}}
