"""MetaGPT's objective and the evaluation summary: ALD, normalised scores, ``eval.json``/``eval.csv``.

The MetaGPT objective
    ``loss_difference``: ``L_t(merged) - L_t(expert_t)`` on task t's own set; its mean over tasks
    is the average loss difference (ALD) that MetaGPT minimises (lower is better, 0 means the merged
    model is as good as every expert on its own task).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metamerge.atomic import write_text_atomic

from .evalsets import PathLike
from .scoring import TaskScores, finite_or_none


def loss_difference(merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]) -> dict[str, float]:
    """``{task: L_t(merged) - L_t(expert_t)}``: what replacing each expert by the merge costs on its task.

    ``experts[t]`` is task t's own expert scored on task t's set. Tasks follow ``experts``' order.
    """
    missing = [t for t in experts if t not in merged]
    if missing:
        raise KeyError(f"merged scores lack task(s) {missing}")
    return {t: merged[t].loss - experts[t].loss for t in experts}


def average_loss_difference(merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]) -> float:
    """ALD, the quantity MetaGPT minimises: the mean of :func:`loss_difference` over tasks."""
    diffs = loss_difference(merged, experts)
    if not diffs:
        raise ValueError("no tasks to average over")
    return sum(diffs.values()) / len(diffs)


def normalized_scores(
    merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]
) -> dict[str, float | None]:
    """``{task: EM(merged on t) / EM(expert_t on t)}``, how much of each expert's accuracy survives.

    ``None`` where the ratio is undefined: a text set (no exact match), exact match not computed,
    or an expert that scores 0 (a ratio to zero says nothing about retention; the loss difference
    still covers that task). A ``None`` task is left out of :func:`average_normalized_score`.
    """
    missing = [t for t in experts if t not in merged]
    if missing:
        raise KeyError(f"merged scores lack task(s) {missing}")
    out: dict[str, float | None] = {}
    for t, expert in experts.items():
        ours, ref = merged[t].exact_match, expert.exact_match
        out[t] = None if ours is None or ref is None or ref == 0 else ours / ref
    return out


def average_normalized_score(
    merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]
) -> float | None:
    """Mean of the defined normalized scores; ``None`` when no task defines one."""
    values = [v for v in normalized_scores(merged, experts).values() if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------------
# Summary (eval.json) and tables
# --------------------------------------------------------------------------------------------------


def summarize(
    scores: Mapping[str, Mapping[str, TaskScores]],
    *,
    merged: str = "merged",
    expert_of: Mapping[str, str] | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """Build the JSON-serialisable evaluation summary (``eval.json``).

    ``scores`` is ``{model_name: {task: TaskScores}}`` (merged, base, experts, other methods).
    ``expert_of`` maps each task to the model name of its expert; by default the expert of task t
    is the model named t. The objective (loss differences, ALD, normalized exact match) is computed
    for every model that was scored on all tasks, so several merge methods can be compared; the
    ``merged`` model's values are repeated at top level for DVC metrics.
    """
    if merged not in scores:
        raise KeyError(f"merged model {merged!r} not in scores (models: {list(scores)})")
    if base is not None and base not in scores:
        raise KeyError(f"base model {base!r} not in scores (models: {list(scores)})")
    tasks = list(expert_of) if expert_of is not None else list(scores[merged])
    expert_of = dict(expert_of) if expert_of is not None else {t: t for t in tasks}
    experts = _expert_scores(scores, expert_of)

    objective = {
        name: _objective(per_task, experts)
        for name, per_task in scores.items()
        if all(t in per_task for t in tasks)
    }
    if merged not in objective:
        raise KeyError(f"merged model {merged!r} lacks task(s) {[t for t in tasks if t not in scores[merged]]}")
    return {
        "merged": merged,
        "base": base,
        "tasks": tasks,
        "expert_of": expert_of,
        **objective[merged],
        "objective": objective,
        "scores": {name: {t: s.to_dict() for t, s in per_task.items()} for name, per_task in scores.items()},
    }


def _expert_scores(
    scores: Mapping[str, Mapping[str, TaskScores]], expert_of: Mapping[str, str]
) -> dict[str, TaskScores]:
    experts = {}
    for task, model in expert_of.items():
        if model not in scores or task not in scores[model]:
            raise KeyError(f"no scores for expert {model!r} on its own task {task!r}")
        experts[task] = scores[model][task]
    return experts


def _objective(per_task: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]) -> dict[str, Any]:
    return {
        "loss_difference": loss_difference(per_task, experts),
        "average_loss_difference": average_loss_difference(per_task, experts),
        "normalized_exact_match": normalized_scores(per_task, experts),
        "average_normalized_exact_match": average_normalized_score(per_task, experts),
    }


_OBJECTIVE_METRICS = ("loss_difference", "normalized_exact_match")


def score_table(summary: Mapping[str, Any], metric: str = "exact_match") -> dict[str, dict[str, float | None]]:
    """``{model: {task: value}}`` for one metric, in report row order; the input of ``plot_scores``.

    ``metric`` is a TaskScores field (``loss``, ``perplexity``, ``exact_match``, ...) or an
    objective metric (``loss_difference``, ``normalized_exact_match``; only models scored on every
    task have those).
    """
    table: dict[str, dict[str, float | None]] = {}
    for name in _row_order(summary):
        if metric in _OBJECTIVE_METRICS:
            if name in summary["objective"]:
                table[name] = dict(summary["objective"][name][metric])
        else:
            per_task = summary["scores"][name]
            table[name] = {t: per_task[t].get(metric) for t in summary["tasks"] if t in per_task}
    return table


def _row_order(summary: Mapping[str, Any]) -> list[str]:
    """merged, base, the experts in task order, then any other models in their given order."""
    first = [summary["merged"]]
    if summary.get("base"):
        first.append(summary["base"])
    first += list(summary["expert_of"].values())
    first += list(summary["scores"])
    return list(dict.fromkeys(n for n in first if n in summary["scores"]))


def _role(summary: Mapping[str, Any], name: str) -> str:
    if name == summary["merged"]:
        return "merged"
    if name == summary.get("base"):
        return "base"
    tasks = [t for t, m in summary["expert_of"].items() if m == name]
    return "expert:" + ",".join(tasks) if tasks else "other"


_CSV_TASK_METRICS = ("loss", "perplexity", "exact_match")


def _csv_text(summary: Mapping[str, Any]) -> str:
    """One row per model; columns ``<task>/<metric>`` then the averaged objective."""
    tasks = summary["tasks"]
    header = ["model", "role"] + [f"{t}/{m}" for t in tasks for m in _CSV_TASK_METRICS]
    header += [f"{t}/loss_difference" for t in tasks]
    header += ["average_loss_difference", "average_normalized_exact_match"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for name in _row_order(summary):
        per_task = summary["scores"][name]
        obj = summary["objective"].get(name, {})
        row: list[Any] = [name, _role(summary, name)]
        row += [per_task.get(t, {}).get(m) for t in tasks for m in _CSV_TASK_METRICS]
        row += [obj.get("loss_difference", {}).get(t) for t in tasks]
        row += [obj.get("average_loss_difference"), obj.get("average_normalized_exact_match")]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf by None recursively: strict JSON parsers (DVC metrics) reject them."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return finite_or_none(value)


def write_eval_outputs(out_dir: PathLike, results: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``eval.json`` (the summary, strict JSON) and ``eval.csv`` (one row per model), atomically.

    ``results`` is the dict returned by :func:`summarize`. Returns ``{"json": path, "csv": path}``.
    """
    out = Path(out_dir)
    json_path, csv_path = out / "eval.json", out / "eval.csv"
    text = json.dumps(_json_safe(results), indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_text_atomic(json_path, text)
    write_text_atomic(csv_path, _csv_text(results))
    return {"json": json_path, "csv": csv_path}
