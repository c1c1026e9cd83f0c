"""The demo's study, reduced (tiny scenario, a 2-point grid), end to end through the real flow:
ephemeral Prefect, real merges, evaluation and a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def study_result(prefect_server, tmp_path_factory, tiny_scenario):
    import shutil

    from flows.study import study_flow

    root = tmp_path_factory.mktemp("study")
    # the session's tiny build, which the flow finds up to date instead of training it again
    shutil.copytree(tiny_scenario.root, root / "scenario")
    result = study_flow(workdir=str(root), size="tiny", seed=0, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                        grid=[0.3, 1.0])
    return root, result


def test_table_has_every_method_and_scores_in_range(study_result):
    root, result = study_result
    data = json.loads((Path(result["dir"]) / "study.json").read_text())
    rows = data["accuracy"]
    expected = {"base", "experts (each on its own task)", "metagpt", "metagpt_tensor", "metagpt_dare",
                "metagpt_ties", "task_arithmetic_0.3", "ties", "dare_ties", "linear", "dare_linear", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "metagpt_breadcrumbs", "metagpt_della", "sce", "ram",
                "ramplus_tl", "multislerp", "karcher", "model_stock"}
    assert expected <= set(rows)
    assert any(name.startswith("task_arithmetic_oracle") for name in rows)
    for name, scores in rows.items():
        assert set(scores) == {"addition", "reverse", "sort", "lookup"}, name
        for v in scores.values():
            assert v is not None and 0.0 <= v <= 1.0, (name, v)
    for name in expected - {"base", "experts (each on its own task)"}:
        assert f"| {name} |" in result["table"]
    for png in ("scores.png", "cosine.png", "linearity.png", "linearity_outputs.png"):
        assert (Path(result["dir"]) / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data["linearity"]["losses"]["sort"]) == len(data["linearity"]["alphas"])
    lin = data["linearity"]
    for task in ("addition", "reverse", "sort", "lookup"):  # the paper's check, on outputs
        errs = lin["output_errors"][task]
        assert lin["output_error"][task] == max(errs) and errs[0] == 0.0 and errs[-1] < 1e-12 and max(errs) > 0


def test_each_expert_beats_the_base_on_its_own_task(study_result):
    root, _ = study_result
    manifest = json.loads((root / "scenario" / "scenario.json").read_text())
    acc = manifest["accuracy"]
    for task in manifest["tasks"]:
        assert acc[f"ft-{task}"][task] > acc["base"][task], task


def test_study_is_logged_to_mlflow(study_result):
    import mlflow
    from mlflow.tracking import MlflowClient

    root, result = study_result
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"study.md", "study.json", "scores.png", "cosine.png", "linearity.png"} <= artifacts
    assert any(k.startswith("avg_accuracy.metagpt") for k in run.data.metrics)
    versions = client.search_model_versions("name='metamerge-demo'")
    from evaluation.study import study_recipes

    # one registered version per compared method (the grid's merges are not registered)
    assert len(versions) == len(study_recipes("base", ["a", "b"]))
    # the gate's rules replayed in registration order: a version is promoted when its score beats
    # both the best promoted so far and its own base model's score (whichever exist; neither: rejected)
    expected, best = None, None
    for v in sorted(versions, key=lambda v: int(v.version)):
        m = client.get_run(v.run_id).data.metrics
        bars = [b for b in (best, m.get("baseline.mean_normalized_score")) if b is not None]
        if bars and m.get("mean_normalized_score", float("-inf")) > max(bars):
            expected, best = str(v.version), m["mean_normalized_score"]
    champion = client.get_registered_model("metamerge-demo").aliases.get("champion")
    assert (None if champion is None else str(champion)) == expected
    from modelregistry.history import read

    assert len(read(client, "metamerge-demo")) == len(versions)  # one logged decision per version
    del mlflow
