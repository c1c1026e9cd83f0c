"""The demo study's steps as plain functions: build the scenario, check linearity, write the report.

The comparison itself (every method through the merge flow) is composed in ``flows/study.py``; the
pure parts (recipes, oracle, table, linearity measures) are ``evaluation.study``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metamerge.atomic import write_text_atomic
from metamerge.refs import sha256_file
from metamerge.report import MergeReport

from .keys import code_version, digest
from .registry_bridge import log_study


def build_scenario(root: str, size: str, seed: int, progress: bool = True, scenario: str = "skills") -> dict:
    """The small base and its fine-tunes; built once, then reused from disk (scenario.json).

    ``finetuned`` holds each task's model reference: a folder, or for LoRA adapters ``BASE+ADAPTER``
    (mergekit's syntax), which every recipe of the study can take, with or without a base_model."""
    from scenarios.build import build_scenario as build

    m = build(root, size=size, seed=seed, progress=progress, scenario=scenario)
    return {"base": str(m.base),
            "finetuned": {t: f"{m.base}+{p}" if m.adapters else str(p) for t, p in m.finetuned.items()},
            "eval_sets": {t: str(p) for t, p in m.eval_sets.items()}, "accuracy": m.accuracy,
            "build_seconds": m.build_seconds}


def linearity_key(base: str, finetuned: dict[str, str], eval_sets: dict[str, str],
                  revisions: dict[str, str]) -> str:
    """Content, not paths: the models' pinned revisions, the eval sets, the alphas, the code."""
    from evaluation import study

    return "linearity-" + digest({
        "models": {ref: revisions[ref] for ref in [base, *finetuned.values()]},
        "eval_sets": {t: sha256_file(Path(p)) for t, p in eval_sets.items()},
        "alphas": list(study.ALPHAS), "code": code_version("linearity")})


def linearity(base: str, finetuned: dict[str, str], eval_sets: dict[str, str]) -> dict[str, dict]:
    """Along theta_0 + alpha * tau_t on task t's own set, for each alpha in ``evaluation.study.ALPHAS``:
    the logits' distance from their chord (``output_error``, the paper's check, and ``output_errors``
    per alpha) and the loss (``losses``)."""
    from evaluation import load_eval_set, study

    out = {}
    for t, ft in finetuned.items():
        examples = load_eval_set(eval_sets[t])
        error, errors = study.output_linearity(base, ft, examples, study.ALPHAS)
        out[t] = {"losses": study.linearity_curve(base, ft, examples, study.ALPHAS),
                  "output_error": error, "output_errors": errors}
    return out


def pipeline_settings(name: str, workdir: Path, scn: dict, registry: dict | None) -> dict[str, Any]:
    """The ``pipeline:`` section of one compared method's merge."""
    return {"name": name, "output_root": str(workdir / "merges"), "eval_sets": scn["eval_sets"],
            "experts": scn["finetuned"], **({"registry": registry} if registry else {})}


def accuracy(summary: dict, model: str = "merged") -> dict[str, float | None]:
    return {t: s.get("exact_match") for t, s in summary["scores"][model].items()}


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def in_short(rows: dict[str, dict], tasks: list[str], oracle_row: str, lam: str, out_err: dict[str, float],
             max_cos: float) -> list[str]:
    """The report's first lines, whatever the numbers show: MetaGPT against task arithmetic at 0.3
    and the oracle (average exact match over the tasks), how linear and how orthogonal the task
    vectors are."""
    from evaluation import study

    avg = {name: study.mean(r.get(t) for t in tasks) for name, r in rows.items()}
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731

    def versus(other: str, label: str) -> str:
        m, o = avg.get("metagpt"), avg.get(other)
        if m is None or o is None:
            return f"{label}: not measured"
        word = "above" if m > o else "below" if m < o else "equal to"
        return f"{word} {label} ({fmt(o)}, {m - o:+.3f})"

    errs = list(out_err.values())
    return [
        f"- Average exact match: base {fmt(avg.get('base'))}, experts on their own tasks "
        f"{fmt(avg.get('experts (each on its own task)'))}, MetaGPT {fmt(avg.get('metagpt'))}.",
        f"- MetaGPT is {versus('task_arithmetic_0.3', 'task arithmetic at lambda 0.3')} and "
        f"{versus(oracle_row, f'the grid-searched oracle (lambda {lam})')}.",
        f"- Linearity of the outputs along each task vector (0 = linear): "
        f"{min(errs):.2f} to {max(errs):.2f}." if errs else "- Linearity: not measured.",
        f"- Orthogonality: max |cos| between task vectors {max_cos:.3f} (0 = orthogonal).",
    ]


def write_report(workdir: str, scn: dict, results: dict, grid: dict, oracle: str, lin: dict,
                 tracking_uri: str | None) -> dict:
    """The table (markdown, JSON), plots, and an MLflow run holding them (with ``tracking_uri``).
    ``lin``: ``linearity``'s result per task."""
    from evaluation import plots, study

    losses = {t: v["losses"] for t, v in lin.items()}
    out_err = {t: v["output_error"] for t, v in lin.items()}

    out = Path(workdir) / "study"
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(scn["finetuned"])
    first = next(iter(results.values()))["summary"]
    rows: dict[str, dict] = {"base": accuracy(first, "base")}
    rows["experts (each on its own task)"] = {t: first["scores"][ft][t]["exact_match"] for t, ft in scn["finetuned"].items()}
    for name, r in results.items():
        rows[name] = accuracy(r["summary"])
    lam = oracle.rsplit("_", 1)[-1]
    rows[f"task_arithmetic_oracle (grid best, lambda={lam})"] = accuracy(grid[oracle]["summary"])
    objective = {name: {"ALD": r["summary"].get("average_loss_difference"),
                        "normalized": r["summary"].get("average_normalized_exact_match")}
                 for name, r in {**results, f"task_arithmetic_oracle (lambda={lam})": grid[oracle]}.items()}
    report = MergeReport.load(results["metagpt"]["model_dir"])
    cosine = report.cosine
    labels = [Path(m).name for m in report.models]
    alphas = list(study.ALPHAS)
    lin_err = {t: study.linearity_error(alphas, curve) for t, curve in losses.items()}

    table = study.markdown_table(rows, tasks)
    obj_lines = ["| method | ALD (lower is better) | mean normalised accuracy |", "|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    obj_lines += [f"| {n} | {fmt(o['ALD'])} | {fmt(o['normalized'])} |" for n, o in objective.items()]
    off = [abs(cosine[i][j]) for i in range(len(cosine)) for j in range(len(cosine)) if i != j and cosine[i][j] is not None]
    oracle_row = f"task_arithmetic_oracle (grid best, lambda={lam})"
    text = "\n".join([
        "## In short", "", *in_short(rows, tasks, oracle_row, lam, out_err, max(off) if off else 0.0), "",
        "## Exact-match accuracy per task (held-out sets)", "", table, "",
        "## MetaGPT's objective", "", *obj_lines, "",
        "## The paper's assumptions, measured",
        f"- Orthogonality: whole-model cosine similarity of task vectors, max |off-diagonal| = "
        f"{max(off) if off else 0:.3f} (MetaGPT assumes close to 0).",
        "- Linearity of the outputs (the paper's check): max over alpha of ||z(alpha) - chord|| / "
        "||z(1) - z(0)||, z the logits along theta_0 + alpha tau_t: "
        + ", ".join(f"{t} {e:.2f}" for t, e in out_err.items()) + " (0 = linear outputs).",
        "- Loss along alpha (not the assumption: curved even for linear outputs), max gap to its chord "
        "relative to the rise: " + ", ".join(f"{t} {e:.2f}" for t, e in lin_err.items()) + ".",
        "- MetaGPT lambdas (whole model): " + ", ".join(
            f"{Path(k).name} {v:.3f}" for k, v in report.coefficients.items()), ""])
    files = {
        "study.md": write_text_atomic(out / "study.md", text),
        "study.json": write_text_atomic(out / "study.json", json.dumps(
            {"accuracy": rows, "objective": objective, "cosine": cosine, "labels": labels,
             "linearity": {"alphas": alphas, "output_error": out_err,
                           "output_errors": {t: v["output_errors"] for t, v in lin.items()},
                           "losses": losses, "loss_chord_error": lin_err},
             "oracle": oracle, "grid": {k: accuracy(v["summary"]) for k, v in grid.items()}}, indent=1)),
        "scores.png": plots.plot_scores(rows, out / "scores.png", title="Exact match per task", ylabel="accuracy"),
        "cosine.png": plots.plot_cosine_heatmap(cosine, labels, out / "cosine.png"),
        "linearity.png": plots.plot_linearity(alphas, losses, out / "linearity.png"),
        "linearity_outputs.png": plots.plot_output_linearity(
            alphas, {t: v["output_errors"] for t, v in lin.items()}, out / "linearity_outputs.png"),
    }
    run_id = None
    if tracking_uri:
        metrics = {f"avg_accuracy.{_metric_name(name)}": avg for name, scores in rows.items()
                   if (avg := study.mean(scores.values())) is not None}
        run_id = log_study(tracking_uri, metrics, list(files.values()))
    return {"dir": str(out), "table": text, "files": {k: str(v) for k, v in files.items()}, "mlflow_run": run_id}
