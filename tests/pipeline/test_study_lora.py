"""The ``lora`` scenario at its tiny size, through the real study flow: the scenario is built (base
pretrained on the related skills, one PEFT LoRA adapter per new skill), its adapters merged as
``BASE+ADAPTER`` with MetaGPT and task arithmetic, the merges and the experts (base + adapter)
evaluated, linearity measured along each adapter's exact update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TASKS = ["flip", "order", "echo", "down"]


@pytest.fixture(scope="module")
def lora_study(prefect_server, tmp_path_factory):
    from flows.study import study_flow

    root = tmp_path_factory.mktemp("lora-study")
    result = study_flow(workdir=str(root), size="tiny", seed=0, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                        grid=[0.3], scenario="lora", methods=["task_arithmetic_0.3"], model_name="lora-test")
    return root, result


def test_the_scenario_is_adapters_that_teach_what_the_base_lacks(lora_study):
    root, _ = lora_study
    scn = root / "scenario"
    manifest = json.loads((scn / "scenario.json").read_text())
    assert manifest["tasks"] == TASKS and manifest["adapters"] is True
    for folder in manifest["finetuned"].values():
        config = json.loads((scn / folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8
        assert config["base_model_name_or_path"] == str(scn / "base")
        assert (scn / folder / "adapter_model.safetensors").is_file()
        assert not (scn / folder / "model.safetensors").exists()  # an adapter, not a full model
    acc = manifest["accuracy"]
    experts = sum(acc[f"ft-{t}"][t] for t in TASKS) / len(TASKS)
    base = sum(acc["base"][t] for t in TASKS) / len(TASKS)
    assert experts > base + 0.2, (experts, base)


def test_the_study_merges_and_evaluates_the_adapters(lora_study):
    root, result = lora_study
    data = json.loads((Path(result["dir"]) / "study.json").read_text())
    rows = data["accuracy"]
    assert {"base", "experts (each on its own task)", "metagpt", "task_arithmetic_0.3"} <= set(rows)
    manifest = json.loads((root / "scenario" / "scenario.json").read_text())
    # the experts as the flow evaluated them (base + adapter, loaded by PEFT) score what the build
    # measured on the merged-in adapter
    for t in TASKS:
        assert rows["experts (each on its own task)"][t] == pytest.approx(manifest["accuracy"][f"ft-{t}"][t])
        assert rows["base"][t] == pytest.approx(manifest["accuracy"]["base"][t])
    lin = data["linearity"]
    for t in TASKS:
        errs = lin["output_errors"][t]
        assert lin["output_error"][t] == max(errs) and errs[0] == 0.0 and errs[-1] < 1e-9
    assert "## In short" in result["table"] and "task arithmetic at lambda 0.3" in result["table"]
    assert "max |cos| between task vectors" in result["table"]


def test_a_second_build_reuses_the_scenario(lora_study):
    from scenarios.build import build_scenario

    root, _ = lora_study
    stamp = (root / "scenario" / "scenario.json").stat().st_mtime_ns
    manifest = build_scenario(root / "scenario", size="tiny", seed=0, progress=False, scenario="lora")
    assert manifest.adapters and (root / "scenario" / "scenario.json").stat().st_mtime_ns == stamp


def test_merge_flow_writes_evaluates_and_registers_one_adapter(lora_study, tmp_path):
    """``pipeline.output: adapter``: the flow merges the scenario's adapters into one PEFT adapter
    (no full model written), evaluates it loaded onto the base, and registers it; the registered
    pyfunc loads it onto the base by reference and generates what the evaluation scored."""
    import mlflow

    from flows.merge_flow import merge_flow

    root, result = lora_study
    scn = root / "scenario"
    manifest = json.loads((scn / "scenario.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"recipe": {"merge_method": "metagpt", "base_model": str(scn / "base"),
                         "models": [{"model": str(scn / f)} for f in manifest["finetuned"].values()]},
              "pipeline": {"output_root": str(tmp_path / "out"), "device": "cpu", "output": "adapter",
                           "eval_sets": {t: str(scn / "eval" / f"{t}.jsonl") for t in TASKS},
                           "registry": {"tracking_uri": uri, "model_name": "lora-merged-adapter"}}}
    out = merge_flow(params)
    model_dir = Path(out["model_dir"])
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(scn / "base")
    assert not list(model_dir.glob("model*.safetensors"))  # an adapter, not a full model
    # evaluated on the base: what the study measured for its full-model MetaGPT merge (the same
    # update, so the same greedy answers up to float32 rounding of the factors)
    study = json.loads((Path(result["dir"]) / "study.json").read_text())
    merged = out["summary"]["scores"]["merged"]
    for t in TASKS:
        assert merged[t]["exact_match"] == pytest.approx(study["accuracy"]["metagpt"][t], abs=0.03)
    reg = out["registered"]
    assert reg["registered"] and reg["version"] == "1"
    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version("lora-merged-adapter", "1")
    assert version.tags["output"] == "lora_adapter"
    assert all(version.tags[f"input.{i}.adapter_base"] == str(scn / "base") for i in range(1, len(TASKS) + 1))
    model = mlflow.pyfunc.load_model("models:/lora-merged-adapter/1")
    prompts = [json.loads(line)["prompt"] for line in (scn / "eval" / f"{TASKS[0]}.jsonl").read_text().splitlines()[:3]]
    assert len(model.predict(prompts, params={"max_new_tokens": 8})) == 3
    # asked twice, nothing is merged or registered again
    again = merge_flow(params)
    assert again["model_dir"] == out["model_dir"] and again["registered"]["version"] == "1"
