"""``evaluate`` (one model on every eval set), ``benchmark`` (lm-eval) and ``report`` (the files DVC
and the UI show)."""

from __future__ import annotations

from prefect import task

from pipeline import keys, reports, steps, store

from .common import ContentKey, load, log, progress_to_log


def _eval_key(params: dict, model_dir: str, revision: str) -> str:
    # the revision is the model's content (a pinned input, or the merged model's file hashes)
    return keys.eval_key(load(params), revision)


@task(name="evaluate", cache_policy=ContentKey(make_key=_eval_key), persist_result=True)
def evaluate(params: dict, model_dir: str, revision: str) -> dict[str, dict]:
    """``{task: scores}`` of one model; base and experts are scored once per revision."""
    with progress_to_log():
        return steps.evaluate(load(params), model_dir, revision, log=log())


def _benchmark_key(params: dict, model_dir: str, revision: str) -> str:
    return keys.benchmark_key(load(params), revision)


@task(name="benchmark", cache_policy=ContentKey(make_key=_benchmark_key), persist_result=True)
def benchmark(params: dict, model_dir: str, revision: str) -> dict[str, dict]:
    """lm-evaluation-harness results of one model (``pipeline.eval.lm_eval``), once per revision."""
    with progress_to_log():
        return steps.benchmark(load(params), model_dir, revision, log=log())


def _report_key(params: dict, info: dict, scores: dict, benchmarks: dict | None = None) -> str:
    return keys.report_key(load(params), info, scores, benchmarks)


def _report_output(params: dict, info: dict, scores: dict, benchmarks: dict | None = None) -> tuple[str, bool]:
    out = store.report_dir(load(params), info["model_dir"])
    return str(out), reports.report_done(out, with_eval=bool(scores))


@task(name="report", cache_policy=ContentKey(make_key=_report_key, output=_report_output, field="dir"),
      persist_result=True)
def report(params: dict, info: dict, scores: dict, benchmarks: dict | None = None) -> dict:
    """merge.json, lambdas.csv/png, eval.json/csv, metrics.json, scores.png beside the merge."""
    p = load(params)
    out = store.report_dir(p, info["model_dir"])
    summary = steps.summarize(p, scores, benchmarks)
    files = {**reports.write_merge_report(info, out), **reports.write_eval_report(summary, out)}
    log()(f"report: {out}")
    return {"dir": str(out), "files": files, "summary": summary}
