"""Params files, prefect.yaml and dvc.yaml: validated before any work, without a server."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from metamerge.errors import MergeError
from pipeline.params import load_params

from pipeline_helpers import params_for

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "params").glob("*.yaml")) + [REPO / "params.yaml"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_repo_params_files_validate(path):
    params = load_params(path, check_files=False)
    assert params.recipe.models


@pytest.mark.parametrize("change, message", [
    (lambda d: d["pipeline"].update(outptu_root="x"), "unknown key 'pipeline.outptu_root'"),
    (lambda d: d.update(pipline={}), "unknown key 'pipline'"),
    (lambda d: d["pipeline"].update(watch=[{"dirr": "x"}]), "unknown key 'pipeline.watch.0.dirr'"),
    (lambda d: d["pipeline"].update(registry={"model_nam": "x"}), "pipeline.registry: unknown key 'model_nam'"),
    (lambda d: d["recipe"].update(merge_method="linear", parameters={"weight": 1.0}, slices=[
        {"sources": [{"model": d["recipe"].pop("models")[0]["model"], "layer_range": [0, 1]}]}]),
     "recipe: slices \\(layer stacking\\) are not supported by the pipeline"),
    (lambda d: d["recipe"].update(merge_method="nope"), "unknown merge_method 'nope'"),
    # when to merge is prefect.yaml's alone (its cron), not a param
    (lambda d: d["pipeline"].update(schedule="0 3 * * *"), "unknown key 'pipeline.schedule'"),
    (lambda d: d["pipeline"].update(device="tpu"), "pipeline.device"),
    (lambda d: d["pipeline"]["eval_sets"].update(add="/no/such.jsonl"), "eval set 'add': no such file"),
    (lambda d: d["pipeline"]["experts"].update(add="/not/in/recipe"), "is not a model of the recipe"),
    (lambda d: (d["recipe"].update(merge_method="model_stock"), d["pipeline"].update(output="adapter")),
     "pipeline.output: adapter: model_stock is not a weighted sum of the task vectors"),
    (lambda d: d["pipeline"].update(adapter_rank=4), "pipeline.adapter_rank applies to `output: adapter` only"),
])
def test_bad_params_are_one_line_errors(tiny_models, tmp_path, change, message):
    data = params_for(tiny_models, tmp_path)
    bad = copy.deepcopy(data)
    change(bad)
    with pytest.raises(MergeError, match=message) as err:
        load_params(bad, "p.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("p.yaml")
    load_params(data)  # the unchanged params are fine


def test_params_round_trip_keeps_the_recipe_hash(tiny_models, tmp_path):
    params = load_params(params_for(tiny_models, tmp_path))
    assert load_params(params.to_dict()).recipe.sha256() == params.recipe.sha256()


def test_prefect_yaml_parses_and_its_entrypoints_load():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    config = PrefectYamlModel.model_validate(raw)
    names = {d.name for d in config.deployments}
    assert names == {"nightly-merge", "watcher"}
    for d in config.deployments:
        flow = load_flow_from_entrypoint(str(REPO / d.entrypoint))
        assert flow.name in ("metamerge-merge", "metamerge-watch")
        assert d.work_pool.name == "metamerge"
        assert (REPO / d.parameters["recipe"]).is_file()
        assert set(d.parameters) <= set(flow.parameters.properties)
    nightly = next(d for d in config.deployments if d.name == "nightly-merge")
    from datetime import datetime

    from cronsim import CronSim  # comes with Prefect

    CronSim(nightly.schedules[0].cron, datetime(2000, 1, 1))  # the one schedule is a valid cron expression


def test_dvc_yaml_stages_call_the_stage_cli():
    from flows.stages import STAGES

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        words = stage["cmd"].split()
        assert words[:3] == ["${python}", "-m", "flows.stages"], name
        assert words[3] in STAGES and words[4] == "params.yaml", name


def test_stage_cli_reports_errors_in_one_line(tmp_path, capsys):
    from flows.stages import main

    (tmp_path / "p.yaml").write_text("recipe: {merge_method: metagpt}\npipeline: {nope: 1}\n")
    assert main(["validate", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "unknown key 'pipeline.nope'" in err


def test_task_vectors_are_base_free_deltas_when_materialised(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from pipeline import keys, steps

    params = load_params(params_for(tiny_models, tmp_path, materialize_task_vectors=True))
    pins = {ref: steps.pin(ref) for ref in keys.input_refs(params)}
    ref = str(tiny_models["ft-a"])
    info = steps.task_vectors(params, pins, ref)
    assert info["materialized"] and steps.task_vector_done(params, pins, ref)
    tau = load_file(Path(info["path"]) / "model.safetensors")
    base = load_file(tiny_models["base"] / "model.safetensors")
    ft = load_file(tiny_models["ft-a"] / "model.safetensors")
    assert set(tau) == set(base)
    for name in base:
        assert (tau[name] == ft[name] - base[name]).all(), name
    streamed = steps.task_vectors(load_params(params_for(tiny_models, tmp_path)), pins, ref)
    assert not streamed["materialized"] and streamed["path"] is None


@pytest.mark.parametrize("module", ["flows.merge_flow", "flows.watch_flow"])
def test_bad_params_fail_before_any_prefect_server_starts(module, tmp_path):
    import os
    import subprocess
    import sys

    home = tmp_path / "prefect-home"
    (tmp_path / "p.yaml").write_text("recipe: {merge_method: task_arithmetic, base_model: ./nowhere, "
                                     "models: [{model: ./nowhere-a}, {model: ./nowhere-b}]}\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", module, str(tmp_path / "p.yaml")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "nowhere" in proc.stderr, proc.stderr
    assert not list(home.rglob("*.db")), "a Prefect server (its database) was started"


@pytest.mark.parametrize("module", ["flows.merge_flow", "flows.watch_flow"])
def test_flow_command_lines_report_usage_and_errors_in_one_line(module, tmp_path, capsys, prefect_server):
    import importlib

    main = importlib.import_module(module).main
    assert main([]) == 2
    assert capsys.readouterr().err.strip() == f"usage: python -m {module} PARAMS.yaml"
    (tmp_path / "p.yaml").write_text("recipe: {merge_method: metagpt}\npipeline: {nope: 1}\n")
    assert main([str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "unknown key 'pipeline.nope'" in err


def test_scenario_stage_reuses_an_up_to_date_build_in_data_dir(tiny_scenario, tmp_path, capsys):
    import shutil

    from flows.stages import run_stage

    data = tmp_path / "data"
    shutil.copytree(tiny_scenario.root, data)
    stamp = (data / "scenario.json").stat().st_mtime_ns
    recipe = {"merge_method": "metagpt", "base_model": str(data / "base"),
              "models": [{"model": str(data / "ft-sort")}]}
    params = load_params({"recipe": recipe, "pipeline": {"data_dir": str(data), "scenario": {"size": "tiny"}}})
    run_stage("scenario", params, tmp_path / "work")
    assert (data / "scenario.json").stat().st_mtime_ns == stamp  # same settings: not rebuilt
    assert "scenario tiny, seed 0" in capsys.readouterr().err
    # other settings than the build's: it would rebuild; a seed is part of what must match
    from scenarios.build import _build_params, _cached

    assert _cached(data, _build_params("tiny", 1)) is None


def test_scenario_stage_without_a_scenario_needs_the_data_dir(tmp_path, capsys):
    from flows.stages import main

    recipe = "recipe: {merge_method: metagpt, base_model: b, models: [{model: f}]}\n"
    (tmp_path / "p.yaml").write_text(recipe + f"pipeline: {{data_dir: {tmp_path / 'nope'}}}\n")
    assert main(["scenario", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pipeline.data_dir" in err and "does not exist" in err
    (tmp_path / "p.yaml").write_text(recipe + "pipeline: {scenario: {size: huge}}\n")
    assert main(["scenario", str(tmp_path / "p.yaml")]) == 2
    assert "pipeline.scenario.size" in capsys.readouterr().err


def test_deployments_are_checked_before_deploying(tiny_models, tmp_path, capsys):
    """prefect.yaml's deployments: refused in one line when their inputs are missing (the demo's
    before `make demo`), listed as ready when they are there."""
    from flows.deployments import main

    deployment = {"name": "watcher", "entrypoint": "flows/watch_flow.py:watch_flow",
                  "parameters": {"recipe": str(tmp_path / "demo.yaml")}}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({"deployments": [deployment]}))
    params = params_for(tiny_models, tmp_path)
    params["pipeline"]["eval_sets"]["add"] = str(tmp_path / "not-built" / "add.jsonl")
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(params))
    assert main([str(tmp_path / "prefect.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'prefect.yaml'}: deployment 'watcher' would fail on every run: ")
    assert "not-built" in err and err.endswith("(build the demo's models and eval sets first: make demo)")
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(params_for(tiny_models, tmp_path)))
    assert main([str(tmp_path / "prefect.yaml")]) == 0
    assert capsys.readouterr().out.strip() == f"watcher: {tmp_path / 'demo.yaml'} ready"


def test_an_adapter_expert_is_evaluated_on_the_base_its_reference_names(tmp_path):
    """``BASE+ADAPTER`` in a recipe without ``base_model``: evaluation applies the adapter to that
    BASE (not to whatever its adapter_config names); a bare adapter folder goes onto the recipe's
    base; anything else is left to the adapter's own config."""
    from pipeline.steps import adapter_base

    for d in ("base", "other", "a1", "a2"):
        (tmp_path / d).mkdir()
    linear = {"merge_method": "linear", "parameters": {"weight": 0.5},
              "models": [{"model": f"{tmp_path / 'base'}+{tmp_path / 'a1'}"},
                         {"model": f"{tmp_path / 'other'}+{tmp_path / 'a2'}"}]}
    p = load_params({"recipe": linear})
    assert adapter_base(p, tmp_path / "a1") == str(tmp_path / "base")
    assert adapter_base(p, tmp_path / "a2") == str(tmp_path / "other")
    assert adapter_base(p, tmp_path / "elsewhere") is None
    ta = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "other"),
          "models": [{"model": str(tmp_path / "a1"), "parameters": {"weight": 1.0}}]}
    assert adapter_base(load_params({"recipe": ta}), tmp_path / "a1") == str(tmp_path / "other")
