"""The files DVC tracks as metrics and plots, and what the flow shows in Prefect's UI.

Beside each merge (``store.report_dir``): ``merge.json`` (lambdas, norms, cosine), ``lambdas.csv``
and ``lambdas.png`` (coefficient per tensor and model), ``cosine.png``, ``eval.json``/``eval.csv``
(the evaluation summary), ``metrics.json`` (small, for ``dvc metrics``) and ``scores.png``.
Every reader of the merge report goes through ``metamerge.report.MergeReport``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from metamerge.atomic import write_text_atomic
from metamerge.layers import layer_index
from metamerge.report import MergeReport

from .params import Params
from .store import write_json


def tensor_coefficients(model_dir: str | Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(models, {tensor: {model: coefficient}}) from the merge report, in tensor order."""
    report = MergeReport.load(model_dir)
    labels = report.models
    table = {name: dict(zip(labels, t["coefficients"])) for name, t in report.tensors.items() if t.get("coefficients")}
    return labels, table


def layer_coefficients(model_dir: str | Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Mean coefficient per layer (tensors outside the layer stack grouped as ``other``)."""
    labels, table = tensor_coefficients(model_dir)
    groups: dict[str, list[dict[str, float]]] = {}
    for name, row in table.items():
        layer = layer_index(name)
        groups.setdefault("other" if layer is None else f"layer {layer}", []).append(row)
    order = sorted(groups, key=lambda g: (g == "other", int(g.split()[1]) if g != "other" else 0))
    return labels, {g: {lab: sum(r[lab] for r in groups[g]) / len(groups[g]) for lab in labels} for g in order}


def write_merge_report(info: dict, out_dir: str | Path) -> dict[str, str]:
    """merge.json (metrics: lambdas, norms, cosine), lambdas.csv and the lambda/cosine plots."""
    from evaluation.plots import plot_cosine_heatmap, plot_lambdas

    out = Path(out_dir)
    report = MergeReport.load(info["model_dir"])
    files = {"merge": write_json(out / "merge.json", {
        "method": report.method, "granularity": report.granularity, "models": report.models,
        "lambdas": info["lambdas"], "norms": report.norms or None, "cosine": report.cosine,
        "revision": info["revision"]})}
    labels, table = tensor_coefficients(info["model_dir"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "tensor", *labels])
    for i, (name, row) in enumerate(table.items()):
        w.writerow([i, name, *(row[lab] for lab in labels)])
    files["lambdas_csv"] = write_text_atomic(out / "lambdas.csv", buf.getvalue())
    if table:
        files["lambdas_png"] = plot_lambdas(table, out / "lambdas.png", title=f"{report.method} coefficient per tensor")
    if report.cosine and len(labels) > 1:
        files["cosine_png"] = plot_cosine_heatmap(report.cosine, labels, out / "cosine.png")
    return {k: str(v) for k, v in files.items()}


def write_eval_report(summary: dict, out_dir: str | Path) -> dict[str, str]:
    """eval.json/eval.csv (the summary), metrics.json (small, for ``dvc metrics``), scores.png."""
    from evaluation import score_table, write_eval_outputs
    from evaluation.plots import plot_scores

    out = Path(out_dir)
    if not summary.get("scores"):  # no eval sets: benchmark results at most
        files = {"metrics": str(write_json(out / "metrics.json", {}))}
        if summary:
            files["json"] = str(write_json(out / "eval.json", summary))
        return files
    files = {k: str(v) for k, v in write_eval_outputs(out, summary).items()}
    merged = summary["scores"][summary["merged"]]
    metrics = {"merged": {t: {"loss": s["loss"], "exact_match": s.get("exact_match")} for t, s in merged.items()}}
    for k in ("average_loss_difference", "average_normalized_exact_match"):
        if k in summary:
            metrics[k] = summary[k]
    files["metrics"] = str(write_json(out / "metrics.json", metrics))
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
