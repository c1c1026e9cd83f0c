"""merge_flow end to end on tiny models, against a real (ephemeral) Prefect server.

One first run is shared by the tests below; each later run checks what the cache must and must not
serve: the same inputs from another process (all cached), a fourth fine-tune (only its norms
computed), a changed recipe (the merge recomputed, the norms reused).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import params_for

REPO = Path(__file__).resolve().parents[2]


def states(result: dict, prefix: str) -> dict[str, str]:
    return {k: v for k, v in result["steps"].items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def first_run(tiny_models, tmp_path_factory, prefect_server):
    from flows.merge_flow import merge_flow

    root = tmp_path_factory.mktemp("flow")
    params = params_for(tiny_models, root)
    return params, merge_flow(params), root


def test_first_run_writes_the_merge_and_its_reports(first_run, tiny_models):
    params, result, root = first_run
    assert set(result["steps"].values()) == {"Completed"}, result["steps"]
    model = Path(result["model_dir"])
    assert model.parent == root / "out" and model.name.startswith("tiny-")
    for name in ("model.safetensors", "config.json", "provenance.json", "merge_report.json", "tokenizer.json"):
        assert (model / name).is_file(), name
    report = Path(result["report_dir"])
    for name in ("merge.json", "lambdas.csv", "lambdas.png", "eval.json", "eval.csv", "metrics.json", "scores.png"):
        assert (report / name).is_file(), name
    refs = [str(tiny_models[f]) for f in ("ft-a", "ft-b", "ft-c")]
    assert list(result["lambdas"]) == refs and abs(sum(result["lambdas"].values()) - 1) < 1e-9
    summary = result["summary"]
    assert set(summary["scores"]) == {"merged", "base", refs[0], refs[1]}
    assert "average_loss_difference" in summary
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["merged"]) == {"add", "rev"}
    assert result["registered"]["registered"] is False  # no registry in these params


def test_prefect_cli_lists_the_task_runs(first_run, prefect_server):
    """Task-run names carry no rich markup: ``prefect task-run ls`` prints them and exits 0."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "COLUMNS": "250"}
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), "task-run", "ls", "--limit", "50"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "compute_norms-ft-a" in proc.stdout and "download-base" in proc.stdout, proc.stdout
    assert "[" not in "".join(line for line in proc.stdout.splitlines() if "compute_norms" in line)


def test_runs_sharing_params_share_one_concurrency_slot(first_run, tiny_models, tmp_path):
    """The nightly deployment and the watcher read the same params: their merges take turns on one
    global concurrency limit (limit 1), released when the run ends; other params, another limit."""
    from prefect.client.orchestration import get_client

    from flows.merge_flow import params_limit_name
    from pipeline.params import load_params

    params, _, _ = first_run
    name = params_limit_name(load_params(params))
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert limit.limit == 1 and limit.active_slots == 0 and limit.active
    assert params_limit_name(load_params(params_for(tiny_models, tmp_path))) != name


def test_flow_output_is_bit_for_bit_the_engines(first_run, tmp_path):
    from metamerge.engine import MergeOptions, merge
    from metamerge.recipe import parse_recipe

    params, result, _ = first_run
    direct = tmp_path / "direct"
    merge(parse_recipe(params["recipe"]), direct, MergeOptions(device="cpu", progress=False))
    flow_dir = Path(result["model_dir"])
    files = sorted(p.name for p in direct.glob("*.safetensors*")) + ["config.json", "merge_report.json"]
    assert "model.safetensors" in files
    for name in files:
        assert (flow_dir / name).read_bytes() == (direct / name).read_bytes(), name


def test_flow_publishes_an_artifact(first_run):
    from prefect.artifacts import Artifact

    art = Artifact.get("metamerge-tiny")
    assert art is not None
    assert "Lambdas per layer" in art.data and "layer 0" in art.data and "Scores per task" in art.data


def test_second_run_in_another_process_is_all_cache_hits(first_run, prefect_server, tmp_path):
    params, result, _ = first_run
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    code = ("import json, sys; from flows.merge_flow import merge_flow; "
            "r = merge_flow(json.load(open(sys.argv[1]))); print('RESULT=' + json.dumps(r))")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout.split("RESULT=", 1)[1])
    assert again["model_dir"] == result["model_dir"]
    # pinning always runs (it is how a change is noticed); everything after it comes from the cache
    assert set(states(again, "download").values()) == {"Completed"}
    rest = {k: v for k, v in again["steps"].items() if not k.startswith("download")}
    assert rest and set(rest.values()) == {"Cached"}, {k: v for k, v in rest.items() if v != "Cached"}


def test_a_fourth_fine_tune_computes_only_its_norms(first_run, tiny_models):
    from flows.merge_flow import merge_flow

    params, result, _ = first_run
    p = copy.deepcopy(params)
    p["recipe"]["models"].append({"model": str(tiny_models["ft-d"])})
    again = merge_flow(p)
    norms = states(again, "compute_norms")
    new = f"compute_norms[{tiny_models['ft-d']}]"
    assert norms.pop(new) == "Completed"
    assert len(norms) == 3 and set(norms.values()) == {"Cached"}
    assert again["steps"]["merge"] == "Completed" and again["model_dir"] != result["model_dir"]
    assert again["steps"]["evaluate[base]"] == "Cached"  # the base did not change
    assert len(again["lambdas"]) == 4


def test_a_changed_recipe_recomputes_the_merge_only(first_run):
    from flows.merge_flow import merge_flow

    params, result, _ = first_run
    p = copy.deepcopy(params)
    p["recipe"]["out_dtype"] = "float16"
    again = merge_flow(p)
    assert set(states(again, "compute_norms").values()) == {"Cached"}
    assert again["steps"]["merge"] == "Completed" and again["model_dir"] != result["model_dir"]
    assert again["steps"]["evaluate[merged]"] == "Completed"


def test_a_deleted_merge_is_rebuilt_by_the_cache_policy_then_cached_again(first_run, tiny_models):
    """No refresh logic in the flow: the merge task's cache policy serves a cached result only while
    the folder it names is complete, so a deleted merge is rebuilt, and the next run is a cache hit."""
    import shutil

    from flows.merge_flow import merge_flow

    params, result, _ = first_run
    p = copy.deepcopy(params)
    p["recipe"]["parameters"] = {"granularity": "model"}  # same merge, another recipe hash
    once = merge_flow(p)
    shutil.rmtree(once["model_dir"])
    shutil.rmtree(once["report_dir"])
    again = merge_flow(p)
    assert again["steps"]["merge"] == "Completed" and again["steps"]["report"] == "Completed"
    assert again["model_dir"] == once["model_dir"] and again["revision"] == once["revision"]
    assert (Path(again["model_dir"]) / "model.safetensors").is_file()
    assert (Path(again["report_dir"]) / "eval.json").is_file()
    assert again["steps"]["evaluate[merged]"] == "Cached"  # same content, same scores
    third = merge_flow(p)
    rest = {k: v for k, v in third["steps"].items() if not k.startswith("download")}
    assert set(rest.values()) == {"Cached"}, rest


def test_another_output_root_gets_its_own_merge_and_reuses_the_scores(first_run, tmp_path):
    """Keys are content only, so a second output root shares every content result (norms, scores),
    but a result naming a folder is served only where that folder is: the merge and its reports
    are written under the new root, never handed out from the first."""
    from flows.merge_flow import merge_flow

    params, result, root = first_run
    p = copy.deepcopy(params)
    p["pipeline"]["output_root"] = str(tmp_path / "elsewhere")
    other = merge_flow(p)
    assert Path(other["model_dir"]).parent == tmp_path / "elsewhere"
    assert Path(other["model_dir"]).name == Path(result["model_dir"]).name
    assert Path(other["report_dir"]).is_relative_to(tmp_path / "elsewhere")
    assert other["revision"] == result["revision"]
    assert other["steps"]["merge"] == "Completed" and other["steps"]["report"] == "Completed"
    assert set(states(other, "compute_norms").values()) == {"Cached"}
    assert set(states(other, "evaluate").values()) == {"Cached"}
    again = merge_flow(params)  # and the first root still gets its own
    assert again["model_dir"] == result["model_dir"] and again["report_dir"] == result["report_dir"]
    assert again["steps"]["merge"] == "Cached" and again["steps"]["report"] == "Cached"


def test_the_merge_is_registered_once(first_run, tmp_path):
    from flows.merge_flow import merge_flow

    params, result, _ = first_run
    p = copy.deepcopy(params)
    p["pipeline"]["registry"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "model_name": "tiny-merged"}
    once = merge_flow(p)
    assert once["steps"]["merge"] == "Cached" and once["steps"]["register"] == "Completed"
    reg = once["registered"]
    assert reg["registered"] and reg["version"] == "1" and reg["model_uri"] == "models:/tiny-merged/1"
    # the first version's bar is the base model's score from the same evaluation
    summary = once["summary"]
    ours, base = summary["average_normalized_exact_match"], summary["objective"]["base"]["average_normalized_exact_match"]
    expected = "promoted" if ours is not None and base is not None and ours > base else "rejected"
    assert reg["decision"]["decision"] == expected, reg["decision"]["reason"]
    # registrations and gate decisions of one registered model take turns: a limit of one slot
    from prefect.client.orchestration import get_client

    from tasks.register import gate_limit_name

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(gate_limit_name("tiny-merged")).limit == 1
    again = merge_flow(p)
    assert again["steps"]["register"] == "Cached" and again["registered"]["version"] == "1"


def test_merge_flow_maps_units_as_prefect_tasks_on_a_dask_task_runner(tiny_models, tmp_path, prefect_server):
    """``executor: {kind: dask}``: the merge's units are task runs of a sub-flow on prefect-dask's
    DaskTaskRunner (a LocalCluster of 2 worker processes); the weights equal the engine's, merged
    in this process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    from flows.merge_flow import merge_flow
    from metamerge.engine import MergeOptions, merge
    from metamerge.executors import ExecutorConfig
    from metamerge.recipe import parse_recipe

    params = params_for(tiny_models, tmp_path, eval_sets={}, experts={},
                        executor={"kind": "dask", "n_workers": 2, "unit_size": "2KB"})
    result = merge_flow(params)
    direct = tmp_path / "direct"
    merge(parse_recipe(params["recipe"]), direct, MergeOptions(device="cpu", progress=False,
                                                               executor=ExecutorConfig(n_workers=1)))
    flow_dir = Path(result["model_dir"])
    for name in ["model.safetensors", "merge_report.json"]:
        assert (flow_dir / name).read_bytes() == (direct / name).read_bytes(), name
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="merge-unit-")))
        mine = [r for r in runs if r.flow_run_id is not None]
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.flow_run_id for r in mine])))
    units = [r for r in mine if r.state_name == "Completed"]
    assert len(units) > 2 and {f.name for f in flows} == {"merge-units"}
