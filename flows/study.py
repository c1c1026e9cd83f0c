"""``study_flow``: the demo's comparison, as in the paper's table, run through the merge flow.

Builds (or reuses) the scenario, merges its fine-tunes with every method (each a ``merge_flow``
subflow: pinned inputs, cached norms, merge, evaluation, MLflow registration with the promotion
gate), adds task arithmetic over a grid of lambdas (the "oracle" search MetaGPT avoids), checks
the paper's two assumptions (orthogonal task vectors, linearity along a task vector) and writes
the table, plots and an MLflow run with all of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows import settings  # noqa: F401  (environment defaults before Prefect loads)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.merge_flow import merge_flow
from tasks.common import keyed
from metamerge import study
from metamerge.atomic import write_text_atomic

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@task(name="build_scenario")
def build_scenario(root: str, size: str, seed: int) -> dict:
    """The small base and its fine-tunes; built once, then reused from disk (scenario.json)."""
    from metamerge.scenario.build import build_scenario as build

    m = build(root, size=size, seed=seed, progress=True)
    return {"base": str(m.base), "finetuned": {t: str(p) for t, p in m.finetuned.items()},
            "eval_sets": {t: str(p) for t, p in m.eval_sets.items()}, "accuracy": m.accuracy,
            "build_seconds": m.build_seconds}


def _linearity_key(base: str, finetuned: dict[str, str], eval_sets: dict[str, str],
                   revisions: dict[str, str]) -> str:
    # content, not paths: the models' pinned revisions (file hashes), the eval sets, the alphas, the code
    from metamerge.refs import sha256_file
    from tasks import steps

    return "linearity-" + steps.digest({
        "models": {ref: revisions[ref] for ref in [base, *finetuned.values()]},
        "eval_sets": {t: sha256_file(Path(p)) for t, p in eval_sets.items()},
        "alphas": ALPHAS, "code": [steps.code_version("evaluate"), sha256_file(Path(study.__file__))]})


@task(name="linearity_check", cache_key_fn=keyed(_linearity_key), persist_result=True)
def linearity_check(base: str, finetuned: dict[str, str], eval_sets: dict[str, str],
                    revisions: dict[str, str]) -> dict[str, list[float]]:
    """Loss of theta_0 + alpha * tau_t on task t's own set, for each alpha in ALPHAS.

    ``revisions`` (reference -> pinned content revision, as the merges pinned them) keys the cache.
    """
    from metamerge.evaluate import load_eval_set

    return {t: study.linearity_curve(base, ft, load_eval_set(eval_sets[t]), ALPHAS) for t, ft in finetuned.items()}


def _pipeline(name: str, workdir: Path, scn: dict, registry: dict | None) -> dict[str, Any]:
    return {"name": name, "output_root": str(workdir / "merges"), "eval_sets": scn["eval_sets"],
            "experts": scn["finetuned"], **({"registry": registry} if registry else {})}


def _accuracy(summary: dict, model: str = "merged") -> dict[str, float | None]:
    return {t: s.get("exact_match") for t, s in summary["scores"][model].items()}


@task(name="study_report")
def study_report(workdir: str, scn: dict, results: dict, grid: dict, oracle: str,
                 linearity: dict, tracking_uri: str | None) -> dict:
    """The table (markdown, JSON), plots, and an MLflow run holding them."""
    from metamerge import plots

    out = Path(workdir) / "study"
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(scn["finetuned"])
    first = next(iter(results.values()))["summary"]
    rows: dict[str, dict] = {"base": _accuracy(first, "base")}
    rows["experts (each on its own task)"] = {t: first["scores"][ft][t]["exact_match"] for t, ft in scn["finetuned"].items()}
    for name, r in results.items():
        rows[name] = _accuracy(r["summary"])
    lam = oracle.rsplit("_", 1)[-1]
    rows[f"task_arithmetic_oracle (grid best, lambda={lam})"] = _accuracy(grid[oracle]["summary"])
    objective = {name: {"ALD": r["summary"].get("average_loss_difference"),
                        "normalized": r["summary"].get("average_normalized_exact_match")}
                 for name, r in {**results, f"task_arithmetic_oracle (lambda={lam})": grid[oracle]}.items()}
    report = json.loads((Path(results["metagpt"]["model_dir"]) / "merge_report.json").read_text())
    cosine = report["model"]["cosine"]
    labels = [Path(m).name for m in report["models"]]
    lin_err = {t: study.linearity_error(ALPHAS, losses) for t, losses in linearity.items()}

    table = study.markdown_table(rows, tasks)
    obj_lines = ["| method | ALD (lower is better) | mean normalised accuracy |", "|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    obj_lines += [f"| {n} | {fmt(o['ALD'])} | {fmt(o['normalized'])} |" for n, o in objective.items()]
    off = [abs(cosine[i][j]) for i in range(len(cosine)) for j in range(len(cosine)) if i != j and cosine[i][j] is not None]
    text = "\n".join([
        "## Exact-match accuracy per task (held-out sets)", "", table, "",
        "## MetaGPT's objective", "", *obj_lines, "",
        "## The paper's assumptions, measured",
        f"- Orthogonality: whole-model cosine similarity of task vectors, max |off-diagonal| = "
        f"{max(off) if off else 0:.3f} (MetaGPT assumes close to 0).",
        "- Linearity: max gap between loss(theta_0 + alpha tau_t) and its chord, relative to the rise: "
        + ", ".join(f"{t} {e:.2f}" for t, e in lin_err.items()) + " (0 = straight line).",
        f"- MetaGPT lambdas (whole model): " + ", ".join(
            f"{Path(k).name} {v:.3f}" for k, v in report["model"]["lambdas"].items()), ""])
    files = {
        "study.md": write_text_atomic(out / "study.md", text),
        "study.json": write_text_atomic(out / "study.json", json.dumps(
            {"accuracy": rows, "objective": objective, "cosine": cosine, "labels": labels,
             "linearity": {"alphas": ALPHAS, "losses": linearity, "error": lin_err},
             "oracle": oracle, "grid": {k: _accuracy(v["summary"]) for k, v in grid.items()}}, indent=1)),
        "scores.png": plots.plot_scores(rows, out / "scores.png", title="Exact match per task", ylabel="accuracy"),
        "cosine.png": plots.plot_cosine_heatmap(cosine, labels, out / "cosine.png"),
        "linearity.png": plots.plot_linearity(ALPHAS, linearity, out / "linearity.png"),
    }
    run_id = None
    if tracking_uri:
        import mlflow

        from modelregistry.config import RegistryConfig

        cfg = RegistryConfig(tracking_uri=tracking_uri)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        exp = mlflow.get_experiment_by_name("metamerge-study") or mlflow.get_experiment(mlflow.create_experiment(
            "metamerge-study", artifact_location=Path(cfg.artifact_location).absolute().as_uri()))
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name="study") as run:
            for name, scores in rows.items():
                avg = study.mean(scores.values())
                if avg is not None:
                    mlflow.log_metric(f"avg_accuracy.{_metric_name(name)}", avg)
            for f in files.values():
                mlflow.log_artifact(str(f))
            run_id = run.info.run_id
    create_markdown_artifact(text, key="metamerge-study", description="every merge method compared, as in the paper")
    return {"dir": str(out), "table": text, "files": {k: str(v) for k, v in files.items()}, "mlflow_run": run_id}


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@flow(name="metamerge-study")
def study_flow(workdir: str = ".demo", size: str = "demo", seed: int = 0,
               tracking_uri: str | None = None, model_name: str = "metamerge-demo",
               grid: list[float] | None = None) -> dict:
    """Every method on the scenario's fine-tunes; returns the table and where everything is."""
    log = get_run_logger()
    root = Path(workdir).absolute()
    scn = build_scenario(str(root / "scenario"), size, seed)
    base, fts = scn["base"], list(scn["finetuned"].values())
    registry = {"tracking_uri": tracking_uri, "model_name": model_name} if tracking_uri else None
    results = {}
    for name, recipe in study.study_recipes(base, fts, seed=seed).items():
        log.info(f"study: {name}")
        results[name] = merge_flow({"recipe": recipe, "pipeline": _pipeline(name, root, scn, registry)})
    grid = {name: merge_flow({"recipe": recipe, "pipeline": _pipeline(name, root, scn, None)})
            for name, recipe in study.grid_recipes(base, fts, grid or study.TA_GRID).items()}
    oracle = study.pick_oracle({k: _accuracy(v["summary"]) for k, v in grid.items()})
    linearity = linearity_check(base, scn["finetuned"], scn["eval_sets"], results["metagpt"]["pins"])
    rep = study_report(str(root), scn, results, grid, oracle, linearity, tracking_uri)
    return {**rep, "registered": {k: v.get("registered") for k, v in results.items()}}
