"""``merge_flow``: pin the inputs, task vectors and norms per fine-tune, merge, evaluate, report, register.

Run it as plain Python (Prefect's ephemeral mode, no server needed)::

    python -m flows.merge_flow params/demo.yaml

Every step is a cached, retryable task (``tasks/``) over a plain function of ``pipeline/``; this
file only composes them (what a rerun serves from the cache is each task's policy, not the flow's).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import pipeline_env  # noqa: F401  (environment defaults before Prefect loads)
from pipeline import keys, reports, steps
from pipeline.params import load_params
from tasks.common import limit_name, one_slot
from tasks.download import download
from tasks.evaluate import benchmark, evaluate, report
from tasks.merge import merge
from tasks.register import register
from tasks.task_vectors import compute_norms, extract_task_vectors


def run_name(label: str) -> str:
    """A task-run name Prefect's CLI and UI show safely: ``compute_norms[/abs/ft-a]`` becomes
    ``compute_norms-ft-a``. Square brackets are rich markup to ``prefect task-run ls`` (a path
    inside them is read as a closing tag and the command exits 1); the full reference is in the
    task run's parameters."""
    m = re.fullmatch(r"(\w+)\[(.*)\]", label)
    if not m:
        return label
    kind, ref = m.groups()
    short = ref.rstrip("/").rsplit("/", 1)[-1].split("@")[0]
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '-', short).strip('-.')[:48] or 'model'}"


class StepStates:
    """Runs tasks and remembers each run's final state name ("Completed", "Cached", ...) under its
    full label (``compute_norms[<ref>]``); the task run itself is named by :func:`run_name`."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def run(self, label: str, task, *args, **kwargs):
        state = task.with_options(task_run_name=run_name(label))(*args, return_state=True, **kwargs)
        self.states[label] = state.name
        return state.result()

    def submit(self, label: str, task, *args, **kwargs):
        return label, task.with_options(task_run_name=run_name(label)).submit(*args, **kwargs)

    def gather(self, submitted) -> list:
        out = []
        for label, future in submitted:
            future.wait()
            self.states[label] = future.state.name
            out.append(future.result())
        return out


def params_limit_name(params) -> str:
    """The global concurrency limit of every merge with these params: runs that share them (the
    nightly deployment and the watcher both read params/demo.yaml) write the same merge, reports
    and registry versions, so they take turns. Keyed by the merge's name and output root."""
    root = keys.digest(str(params.output_root))[:8]
    return _artifact_key(f"merge-{params.name}-{root}")


@contextlib.contextmanager
def one_at_a_time(params):
    """Hold the one slot of :func:`params_limit_name` for the duration of the merge."""
    with one_slot(params_limit_name(params)):
        yield


def _artifact_key(name: str) -> str:
    return limit_name(name)


@flow(name="metamerge-merge")
def merge_flow(recipe: str | dict[str, Any] = "params/demo.yaml") -> dict[str, Any]:
    """Merge the models of a params file (path or mapping); returns where the merge is and more.

    The result: ``model_dir`` (the merged model), ``report_dir``, ``revision`` (content hash of the
    merged files), ``lambdas``, ``summary`` (scores), ``registered`` and ``steps`` (each task run's
    final state, e.g. ``{"compute_norms[ft-a]": "Cached"}``).
    """
    params = load_params(recipe)        # validated before any work starts
    steps.check_inputs(params)
    with one_at_a_time(params):
        return _merge(params, StepStates())


def _merge(params, run: StepStates) -> dict[str, Any]:
    p = params.to_dict()

    refs = keys.input_refs(params)
    pins = dict(zip(refs, run.gather([run.submit(f"download[{r}]", download, r) for r in refs])))
    steps.check_tokenizers(params, pins)  # evaluation's tokenizers, before any merge work

    sqnorms = {}
    for ref in keys.fine_tunes(params):
        if params.recipe.base_model:
            run.run(f"extract_task_vectors[{ref}]", extract_task_vectors, p, pins, ref)
        if keys.needs_norms(params):
            sqnorms[ref] = run.run(f"compute_norms[{ref}]", compute_norms, p, pins, ref)

    info = run.run("merge", merge, p, pins, sqnorms)

    scores = {}
    if params.pipeline.eval_sets:
        scores["merged"] = run.run("evaluate[merged]", evaluate, p, info["model_dir"], info["revision"])
        for name, ref in steps.models_to_score(params, pins).items():
            scores[name] = run.run(f"evaluate[{name}]", evaluate, p, pins[ref]["path"], pins[ref]["revision"])
    benchmarks = None
    if params.pipeline.eval.lm_eval is not None:
        benchmarks = run.run("benchmark[merged]", benchmark, p, info["model_dir"], info["revision"])
    rep = run.run("report", report, p, info, scores, benchmarks)
    registered = run.run("register", register, p, info, rep["summary"], sorted(rep["files"].values()))

    create_markdown_artifact(reports.render_markdown(params, info, rep["summary"]), key=_artifact_key(params.name),
                             description=f"metamerge: lambdas per layer and scores of {params.name}")
    if rows := reports.score_rows(rep["summary"]):
        create_table_artifact(rows, key=_artifact_key(f"{params.name}-scores"),
                              description="per-task scores of the merged model, the base and the experts")
    return {"model_dir": info["model_dir"], "report_dir": rep["dir"], "revision": info["revision"],
            "lambdas": info["lambdas"], "summary": rep["summary"], "registered": registered,
            "pins": {r: d["revision"] for r, d in pins.items()}, "steps": run.states}


def run_from_command_line(module: str, argv: list[str] | None, run) -> int:
    """``python -m MODULE PARAMS.yaml``: ``run(path)`` returns the line to print; errors are one line.

    The params and the inputs they name are checked first, in this process: a bad file fails in a
    second with one line, before Prefect starts a (temporary) server or creates any flow run."""
    from metamerge.errors import run_cli

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} PARAMS.yaml", file=sys.stderr)
        return 2

    def checked_then_run() -> None:
        steps.check_inputs(load_params(args[0]))
        print(run(args[0]))

    return run_cli(checked_then_run)


def main(argv: list[str] | None = None) -> int:
    return run_from_command_line("flows.merge_flow", argv, lambda path: merge_flow(path)["model_dir"])


if __name__ == "__main__":
    sys.exit(main())
