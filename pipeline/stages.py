"""The pipeline's steps as DVC stages (``dvc.yaml``): the same functions the Prefect tasks call.

    python -m flows.stages STAGE PARAMS.yaml [--dir DIR]

STAGE is one of scenario, validate, download, task-vectors, norms, merge, evaluate-inputs, evaluate,
register. Stages hand each other small files in DIR (default ``<output_root>/dvc``)::

    scenario      -> <data_dir>           the demo's models and eval sets (only with pipeline.scenario)
    download      -> pins.json            every input reference pinned (revision, path, file hashes);
                                          paths relative to the working directory when inside it
                     scored.json          what evaluate-inputs reads: the base and experts pinned,
                                          the eval sets' sha256 (a new fine-tune leaves it alone)
    task-vectors  -> task_vectors.json    streamed, or where each materialised tau_t lies (not a
                                          DVC stage: nothing reads it; the flow materialises on request)
    norms         -> norms.json           ||tau_t||^2 per fine-tune and tensor
    merge         -> model/, merge.json, lambdas.csv, lambdas.png, cosine.png
    evaluate-inputs -> input_scores.json  the base and the experts scored (not rerun by a new merge)
    evaluate      -> eval.json, eval.csv, metrics.json, scores.png   (the merged model scored)
    register      -> registry.json        the version (one per merged weights) and its lineage:
                                          ``dvc_lock_sha256`` is :func:`upstream_lock_sha256`

What reruns is DVC's to decide, from each stage's exact deps and params; the steps keep no cache
of their own. The norms are read from the merge core's cache (``METAMERGE_CACHE_DIR``), so a norms
stage that reruns for one new fine-tune makes one norm pass. No Prefect is imported. Errors are
one line (``error: ...``, exit status 2). Progress goes to stderr as lines (one per tenth of each
training run, norm pass, merge and evaluation), which ``dvc repro`` shows as the stage runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from metamerge.atomic import write_text_atomic
from metamerge.errors import InputError, run_cli
from metamerge.progress import report_to

from . import reports, steps
from .keys import digest, eval_set_hashes, fine_tunes, input_refs, needs_norms
from .params import Params, load_params
from .registry_bridge import register
from .store import read_json

STAGES = ("scenario", "validate", "download", "task-vectors", "norms", "merge", "evaluate-inputs", "evaluate",
          "register")
REPORT_FILES = ("merge.json", "eval.json", "eval.csv", "metrics.json", "lambdas.csv", "lambdas.png", "cosine.png",
                "scores.png")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _read(path: Path, stage: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise InputError(f"{path} is missing: run the '{stage}' stage first (dvc repro runs them in order)") from None


def portable_pin(pin: dict) -> dict:
    """A pin whose path is relative to the working directory (DVC's repository root) when it lies
    inside it, so ``pins.json`` and the ``dvc.lock`` that hashes it are the same in every checkout."""
    path = Path(pin["path"])
    try:
        return {**pin, "path": path.absolute().relative_to(Path.cwd().absolute()).as_posix()}
    except ValueError:  # a hub snapshot or a folder elsewhere: only absolute makes sense
        return pin


def upstream_lock_sha256(lock: Path, stage: str = "register") -> str | None:
    """sha256 of this run's ``dvc.lock`` entries for every stage but ``stage`` (canonical JSON).

    DVC writes each stage's entry when that stage finishes, so while ``register`` runs the entries
    of the stages before it are this run's, and its own is the previous run's: hashing the file
    whole would name the previous run. ``None`` outside a DVC repository."""
    if not lock.is_file():
        return None
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    stages = {k: v for k, v in (data.get("stages") or {}).items() if k != stage}
    return digest(stages)


def scored(params: Params, pins: dict[str, dict]) -> dict:
    """What scoring the base and the experts depends on, beside the eval settings: those models
    pinned (portable) and the eval sets' content. Its own file, so that a new fine-tune (a new
    ``pins.json``) does not rerun their evaluation."""
    models = {name: portable_pin(pins[ref]) for name, ref in steps.models_to_score(params, pins).items()}
    return {"models": {name: {"path": pin["path"], "revision": pin["revision"]} for name, pin in models.items()},
            "eval_sets": eval_set_hashes(params)}


def build_data(params: Params) -> None:
    """The ``scenario`` stage: build the demo scenario into ``data_dir`` (reused when already built
    with the same settings), or, without ``pipeline.scenario``, check that ``data_dir`` is there."""
    p = params.pipeline
    if p.data_dir is None:
        raise InputError(f"{params.source}: pipeline.data_dir is not set: DVC needs the folder of the inputs")
    if p.scenario is None:
        if not Path(p.data_dir).is_dir():
            raise InputError(f"{params.source}: pipeline.data_dir {p.data_dir} does not exist: put the models "
                             "there, or set pipeline.scenario to build the demo's")
        _log(f"{p.data_dir}: given (no pipeline.scenario to build)")
        return
    from scenarios.build import build_scenario

    m = build_scenario(p.data_dir, size=p.scenario.size, seed=p.scenario.seed, progress=False)
    _log(f"{p.data_dir}: scenario {m.size}, seed {m.seed}, {m.num_parameters} parameters per model")


def run_stage(stage: str, params: Params, workdir: Path) -> None:
    if stage == "scenario":
        build_data(params)
        return
    if stage == "validate":
        steps.check_inputs(params)
        _log(f"{params.source}: valid ({params.recipe.merge_method}, {len(fine_tunes(params))} model(s))")
        return
    if stage == "download":
        steps.check_inputs(params)
        pins = {ref: steps.pin(ref, _log) for ref in input_refs(params)}
        steps.check_tokenizers(params, pins)  # evaluation's tokenizers, before any merge work
        _write(workdir / "pins.json", {ref: portable_pin(pin) for ref, pin in pins.items()})
        _write(workdir / "scored.json", scored(params, pins))
        return
    pins = _read(workdir / "pins.json", "download")
    if stage == "task-vectors":
        tvs = {ref: steps.task_vectors(params, pins, ref, _log) for ref in fine_tunes(params)} \
            if params.recipe.base_model else {}
        _write(workdir / "task_vectors.json", tvs)
    elif stage == "norms":
        sq = {ref: steps.norms(params, pins, ref, _log) for ref in fine_tunes(params)} if needs_norms(params) else {}
        _write(workdir / "norms.json", sq)
    elif stage == "merge":
        sq = _read(workdir / "norms.json", "norms")
        info = steps.merge(params, pins, sq, out_dir=workdir / "model", log=_log)
        reports.write_merge_report(info, workdir)
    elif stage == "evaluate-inputs":
        models = _read(workdir / "scored.json", "download")["models"]
        _write(workdir / "input_scores.json",
               {name: steps.evaluate(params, pin["path"], pin["revision"], _log) for name, pin in models.items()})
    elif stage == "evaluate":
        info = steps.merge_info(workdir / "model")
        scores = {"merged": steps.evaluate(params, info["model_dir"], info["revision"], _log),
                  **_read(workdir / "input_scores.json", "evaluate-inputs")}
        benchmarks = steps.benchmark(params, info["model_dir"], info["revision"], _log)
        reports.write_eval_report(steps.summarize(params, scores, benchmarks), workdir)
    elif stage == "register":
        info = steps.merge_info(workdir / "model")
        summary = read_json(workdir / "eval.json") or {}
        files = [workdir / n for n in REPORT_FILES if (workdir / n).is_file()]
        lock = upstream_lock_sha256(Path("dvc.lock"))
        lineage = {"dvc_lock_sha256": lock, "dvc_lock_scope": "stages before register"} if lock else {}
        _write(workdir / "registry.json", register(params, info, summary, _log, lineage=lineage, extra_artifacts=files))
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("params", help="a pipeline params file (params.yaml, params/*.yaml)")
    parser.add_argument("--dir", help="where stages exchange files (default: <output_root>/dvc)")
    args = parser.parse_args(argv)

    def stage() -> None:
        # the scenario stage makes the eval sets the other stages check for
        params = load_params(args.params, check_files=args.stage != "scenario")
        with report_to(_log):  # progress as lines in DVC's output: no stage is silent for minutes
            run_stage(args.stage, params, Path(args.dir) if args.dir else params.output_root / "dvc")

    return run_cli(stage)
