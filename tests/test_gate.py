"""The promotion gate's rules, its decision log and two gate decisions at once, on a real MLflow
registry (a SQLite store per test).

Versions here are real registered versions of real runs whose metrics are logged through
``MlflowClient``; they carry no model files (the gate reads only the run's metrics), which keeps
each test at a second or two. ``test_registry.py`` covers the same gate on registered merges.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest

from metamerge.errors import MergeError

NAME = "gate-model"


@pytest.fixture
def config(tmp_path):
    from modelregistry.config import RegistryConfig

    return RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", experiment_name="gate", model_name=NAME)


def new_version(config, metrics: dict[str, float], name: str = NAME) -> str:
    """A registered version of a fresh run holding ``metrics``; the gate is not run."""
    from mlflow.exceptions import MlflowException

    client = config.client()
    exp = client.get_experiment_by_name(config.experiment_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(config.experiment_name,
                                                                      artifact_location=config.artifact_location)
    run = client.create_run(exp_id, tags={"prefect_flow_run_id": "run-7"})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    return str(client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version)


def gate(config, version, **kw):
    from modelregistry.promotion import apply_gate

    return apply_gate(NAME, version, config, **kw)


def champion(config):
    from modelregistry.promotion import champion_version

    mv = champion_version(config.client(), NAME)
    return None if mv is None else str(mv.version)


def log(config):
    from modelregistry.history import read

    return read(config.client(), NAME)


M = "mean_normalized_score"
B = "baseline.mean_normalized_score"


def test_quality_cannot_ratchet_down_within_tolerance(config):
    """0.85 -> 0.835 -> 0.82 -> 0.805 with tolerance 0.02: each is within 0.02 of the previous
    champion, but only the first is within 0.02 of the best promoted score."""
    cfg = config.model_copy(update={"tolerance": 0.02})
    results = [gate(cfg, new_version(cfg, {M: v, B: 0.5})) for v in (0.85, 0.835, 0.82, 0.805)]
    assert [r.decision for r in results] == ["promoted", "promoted", "rejected", "rejected"]
    assert champion(cfg) == "2"
    assert results[2].reason == "mean_normalized_score 0.82 <= best promoted v1's 0.85 - 0.02 (tolerance)"
    assert results[3].champion_value == 0.85 and results[3].baseline_source == "best promoted v1"


def test_first_version_must_beat_the_base_and_ties_do_not_promote(config):
    worse = gate(config, new_version(config, {M: 0.0, B: 0.4}))
    assert worse.decision == "rejected" and champion(config) is None
    assert worse.reason == "mean_normalized_score 0 <= the base model's 0.4 - 0 (tolerance)"
    tie = gate(config, new_version(config, {M: 0.4, B: 0.4}))
    assert tie.decision == "rejected" and champion(config) is None
    better = gate(config, new_version(config, {M: 0.41, B: 0.4}))
    assert better.decision == "promoted" and champion(config) == "3"
    tie_with_champion = gate(config, new_version(config, {M: 0.41, B: 0.4}))
    assert tie_with_champion.decision == "rejected" and champion(config) == "3"


def test_lower_is_better_metric_uses_the_smallest_baseline(config):
    cfg = config.model_copy(update={"metric": "ald", "greater_is_better": False})
    assert gate(cfg, new_version(cfg, {"ald": 0.5, "baseline.ald": 0.4})).decision == "rejected"
    assert gate(cfg, new_version(cfg, {"ald": 0.3, "baseline.ald": 0.4})).decision == "promoted"
    d = gate(cfg, new_version(cfg, {"ald": 0.35, "baseline.ald": 0.2}))
    assert d.decision == "rejected" and d.reason == "ald 0.35 >= the base model's 0.2 + 0 (tolerance)"


def test_missing_or_non_finite_metrics_reject(config):
    no_metric = gate(config, new_version(config, {B: 0.1}))
    assert no_metric.decision == "rejected" and "has no mean_normalized_score" in no_metric.reason
    nan_metric = gate(config, new_version(config, {M: math.nan, B: 0.1}))
    assert nan_metric.decision == "rejected" and "non-finite (nan) mean_normalized_score" in nan_metric.reason
    nan_task = gate(config, new_version(config, {M: 0.9, B: 0.1, "qa.normalized_score": math.nan,
                                                 "arith.normalized_score": 0.9}))
    assert nan_task.decision == "rejected" and nan_task.reason == "non-finite normalized score for task(s): qa"
    no_base = gate(config, new_version(config, {M: 0.9}))
    assert no_base.decision == "rejected" and no_base.reason.startswith("no baseline")
    assert champion(config) is None
    entries = log(config)
    assert [e.result for e in entries] == ["rejected"] * 4
    assert entries[1].value == "nan" and entries[2].compared["qa.normalized_score"] == "nan"


def test_a_rolled_back_version_no_longer_sets_the_bar(config):
    from modelregistry.promotion import rollback

    assert gate(config, new_version(config, {M: 0.6, B: 0.5})).promoted
    assert gate(config, new_version(config, {M: 0.9, B: 0.5})).promoted
    rollback(NAME, config, reason="broken outputs", user="bob")
    assert champion(config) == "1"
    d = gate(config, new_version(config, {M: 0.7, B: 0.5}))
    assert d.promoted and d.baseline_source == "best promoted v1" and champion(config) == "3"
    entries = log(config)
    assert [(e.version, e.result, e.rule) for e in entries] == [
        ("1", "promoted", "gate"), ("2", "promoted", "gate"), ("2", "rolled_back", "rollback"),
        ("3", "promoted", "gate")]
    assert entries[2].user == "bob" and entries[2].reason == "rolled back to v1: broken outputs"


def test_forced_promotion_is_logged_as_forced_and_keeps_the_rejection(config, capsys):
    from modelregistry.cli import main as registry_main

    v = new_version(config, {M: 0.2, B: 0.5})
    assert gate(config, v).decision == "rejected"
    assert registry_main(["promote", NAME, v, "--tracking-uri", config.tracking_uri]) == 2
    assert champion(config) is None
    assert registry_main(["promote", NAME, v, "--reason", "hotfix", "--tracking-uri", config.tracking_uri]) == 0
    assert champion(config) == v
    entries = log(config)
    assert [(e.result, e.rule, e.reason) for e in entries] == [
        ("rejected", "gate", "mean_normalized_score 0.2 <= the base model's 0.5 - 0 (tolerance)"),
        ("promoted", "forced", "manual: hotfix")]
    assert entries[1].user and entries[1].flow_run_id is None  # by hand, outside any flow run
    capsys.readouterr()
    assert registry_main(["history", "no-such-model", "--tracking-uri", config.tracking_uri]) == 2
    assert "no registered model 'no-such-model'" in capsys.readouterr().err


def _decide(uri: str, version: str, barrier) -> None:
    """One process's gate decision, started together with the other's."""
    from modelregistry.config import RegistryConfig
    from modelregistry.promotion import apply_gate

    config = RegistryConfig(tracking_uri=uri, experiment_name="gate", model_name=NAME)
    client = config.client()
    barrier.wait()
    apply_gate(NAME, version, config, client)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_two_gate_decisions_at_once_leave_one_champion_and_a_consistent_log(config, order):
    """Two processes decide on two versions at the same moment: the better one ends as champion
    whichever decides first, both decisions are logged, and each decision's previous champion is
    the champion the decision before it left."""
    versions = {"a": new_version(config, {M: 0.85, B: 0.5}), "b": new_version(config, {M: 0.9, B: 0.5})}
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_decide, args=(config.tracking_uri, versions[k], barrier)) for k in order]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]

    assert champion(config) == versions["b"]
    entries = log(config)
    assert sorted(e.version for e in entries) == sorted(versions.values())
    chain = None
    for e in entries:
        assert e.previous_champion == chain
        chain = e.champion
    assert chain == versions["b"]
    first, second = entries
    if first.version == versions["a"]:  # a promoted first, then b beat it
        assert (first.result, second.result) == ("promoted", "promoted")
        assert second.baseline_source == f"best promoted v{versions['a']}"
    else:  # b first; a is below the best promoted score
        assert (first.result, second.result) == ("promoted", "rejected")
    client = config.client()
    path = client.download_artifacts(client.get_model_version(NAME, second.version).run_id, "promotion/history.json")
    history = json.loads(Path(path).read_text())
    assert [d["version"] for d in history["decisions"]] == [first.version, second.version]


def test_gate_refuses_an_unknown_version(config):
    new_version(config, {M: 0.5})
    with pytest.raises(MergeError, match="has no version 9"):
        gate(config, "9")
