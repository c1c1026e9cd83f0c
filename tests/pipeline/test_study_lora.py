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
