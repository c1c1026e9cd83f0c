"""``study_flow``: the demo's comparison, as in the paper's table, run through the merge flow.

Builds (or reuses) the scenario, merges its fine-tunes with every method (each a ``merge_flow``
subflow: pinned inputs, cached norms, merge, evaluation, MLflow registration with the promotion
gate), adds task arithmetic over a grid of lambdas (the "oracle" search MetaGPT avoids), checks
the paper's two assumptions (orthogonal task vectors, linearity along a task vector) and writes
the table, plots and an MLflow run with all of it (``tasks.study``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

import pipeline_env  # noqa: F401  (environment defaults before Prefect loads)
from evaluation import study
from flows.merge_flow import merge_flow
from pipeline.study import accuracy, pipeline_settings
from tasks.study import build_scenario, linearity_check, study_report


@flow(name="metamerge-study")
def study_flow(workdir: str = ".demo", size: str = "demo", seed: int = 0,
               tracking_uri: str | None = None, model_name: str = "metamerge-demo",
               grid: list[float] | None = None, scenario: str = "skills",
               methods: list[str] | None = None) -> dict:
    """Every method on the scenario's fine-tunes (``skills``: full fine-tunes; ``lora``: LoRA
    adapters, given as ``BASE+ADAPTER``); returns the table and where everything is. ``methods``: only
    these of the study's methods (``metagpt`` always), for a quicker run."""
    log = get_run_logger()
    root = Path(workdir).absolute()
    scn = build_scenario(str(root / "scenario"), size, seed, scenario)
    base, fts = scn["base"], list(scn["finetuned"].values())
    registry = {"tracking_uri": tracking_uri, "model_name": model_name} if tracking_uri else None
    results = {}
    recipes = study.study_recipes(base, fts, seed=seed)
    if methods is not None:
        recipes = {k: r for k, r in recipes.items() if k == "metagpt" or k in methods}
    for name, recipe in recipes.items():
        log.info(f"study: {name}")
        results[name] = merge_flow({"recipe": recipe, "pipeline": pipeline_settings(name, root, scn, registry)})
    grid = {name: merge_flow({"recipe": recipe, "pipeline": pipeline_settings(name, root, scn, None)})
            for name, recipe in study.grid_recipes(base, fts, grid or study.TA_GRID).items()}
    oracle = study.pick_oracle({k: accuracy(v["summary"]) for k, v in grid.items()})
    linearity = linearity_check(base, scn["finetuned"], scn["eval_sets"], results["metagpt"]["pins"])
    rep = study_report(str(root), scn, results, grid, oracle, linearity, tracking_uri)
    return {**rep, "registered": {k: v.get("registered") for k, v in results.items()}}
