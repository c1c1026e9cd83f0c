"""What a registration records as MLflow params and metrics: the merge report and the scores, flattened."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from metamerge.report import MergeReport

_SUMMARY_ALIASES = {"average_normalized_exact_match": "mean_normalized_score",
                    "average_loss_difference": "ald"}


def mlflow_key(text: str) -> str:
    """A valid MLflow metric/param/tag key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", text)[:250] or "_"


def number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def score_metrics(scores: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> dict[str, float]:
    """Flatten ``scores``/``summary`` into MLflow metrics (``None`` and non-numbers are skipped).

    Per-task normalized scores come from ``scores[task]["normalized_score"]``, else
    ``summary["normalized_scores"][task]`` or ``summary["normalized_exact_match"][task]``
    (``evaluation.summarize``'s name); ``summary["loss_difference"][task]`` becomes
    ``<task>.loss_difference``. ``mean_normalized_score`` and ``ald`` also accept evaluate's
    ``average_normalized_exact_match`` and ``average_loss_difference``. The base model's own
    ``mean_normalized_score``/``ald`` (see :func:`_baseline`) become ``baseline.<name>``.
    """
    out: dict[str, float] = {}
    summary = dict(summary or {})
    per_task_norm = {**(summary.get("normalized_exact_match") or {}), **(summary.get("normalized_scores") or {})}
    loss_diff = summary.get("loss_difference") or {}
    for task, values in (scores or {}).items():
        t = mlflow_key(str(task))
        for k, v in (values or {}).items():
            if (x := number(v)) is not None:
                out[f"{t}.{mlflow_key(str(k))}"] = x
        if f"{t}.normalized_score" not in out and (x := number(per_task_norm.get(task))) is not None:
            out[f"{t}.normalized_score"] = x
        if (x := number(loss_diff.get(task) if isinstance(loss_diff, Mapping) else None)) is not None:
            out.setdefault(f"{t}.loss_difference", x)
    for task, v in per_task_norm.items():  # tasks present only in the summary
        if (x := number(v)) is not None:
            out.setdefault(f"{mlflow_key(str(task))}.normalized_score", x)
    for k, v in summary.items():
        if (x := number(v)) is not None:
            out.setdefault(mlflow_key(_SUMMARY_ALIASES.get(k, k)), x)
    for k, v in _baseline(summary).items():
        if (x := number(v)) is not None:
            out.setdefault(f"baseline.{mlflow_key(_SUMMARY_ALIASES.get(k, k))}", x)
    for bench, values in (summary.get("lm_eval") or {}).items():  # lm-evaluation-harness results
        for k, v in (values or {}).items():
            if (x := number(v)) is not None:
                out[f"lm_eval.{mlflow_key(str(bench))}.{mlflow_key(str(k))}"] = x
    return out


def _baseline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The unmerged base model's averaged scores from the same evaluation (``evaluation.summarize``'s
    ``objective[base]``), or a plain ``summary["baseline"]`` mapping: the gate's first bar."""
    if isinstance(summary.get("baseline"), Mapping):
        return dict(summary["baseline"])
    base, objective = summary.get("base"), summary.get("objective")
    if base and isinstance(objective, Mapping) and isinstance(objective.get(base), Mapping):
        return {k: v for k, v in objective[base].items() if k in _SUMMARY_ALIASES}
    return {}


def report_params(report: MergeReport, provenance: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    """Params (method, refs, revisions, ...) and metrics (lambdas or mean coefficients, norms) of a merge."""
    models = list(report.models)
    params: dict[str, Any] = {
        "method": report.method, "granularity": report.granularity, "base": report.base,
        "n_models": len(models), "recipe_sha256": provenance.get("recipe_sha256"),
        "dtype": report.dtype, "out_dtype": report.out_dtype,
        "tokenizer_source": provenance.get("tokenizer_source"), "device": provenance.get("device"),
    }
    for i, ref in enumerate(models):
        params[f"model.{i}"] = ref
    for k, v in report.parameters.items():
        params[f"parameter.{mlflow_key(str(k))}"] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    for i, item in enumerate(provenance.get("inputs", [])):
        params[f"input.{i}.revision"] = item.get("revision")
    for k, v in (provenance.get("versions") or {}).items():
        params[f"version.{mlflow_key(str(k))}"] = v
    params = {k: str(v)[:6000] for k, v in params.items() if v is not None}
    metrics: dict[str, float] = {}
    # whole-model lambdas (one coefficient per model) or per-tensor coefficients averaged
    coefficient = "lambda" if report.model.get("lambdas") else "coefficient"
    for prefix, values in ((coefficient, report.coefficients), ("task_vector_norm", report.norms)):
        for i, ref in enumerate(models):
            if (x := number(values.get(ref))) is not None:
                metrics[f"{prefix}.{i}"] = x
    return params, metrics
