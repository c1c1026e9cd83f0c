"""dvc.yaml lists, for every stage, each params key the stage reads: the stages run in-process on
the tiny models while every read of a params field is recorded, and each read key must be one the
stage's ``params:`` lists (or lies under one). A key read but not listed is a stale result waiting
to happen: DVC would not rerun the stage when it changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_helpers import params_for

REPO = Path(__file__).resolve().parents[2]

# Read, but on purpose not a DVC params dependency of the stage, each with why. ``*``: every stage.
NOT_DEPENDENCIES = {
    ("*", "pipeline.output_root"): "where the stages exchange files: the paths in cmd/deps/outs",
    ("*", "pipeline.data_dir"): "the scenario's folder: an out of `scenario`, a dep of `download`",
    ("merge", "pipeline.executor"): "how the units are scheduled: the output bytes are the same on every executor",
    # an adapter is scored on the recipe's base: that base is itself a scored model in scored.json
    # (its pin changes with it), and the merged model folder (a dep) is the merge of that base
    ("evaluate-inputs", "recipe"): "which base a bare-adapter expert is applied to: pinned in scored.json",
    ("evaluate", "recipe"): "which base a merged adapter is applied to: fixed by the merged model folder",
}


def exempt(stage: str) -> list[str]:
    return [key for (where, key) in NOT_DEPENDENCIES if where in ("*", stage)]


class Recorder:
    """Records ``prefix.field`` for every field read on the params' pydantic models, including the
    fields a ``model_dump`` call returns (how the eval settings are hashed whole)."""

    def __init__(self, params):
        self.reads: set[str] = set()
        self.prefix: dict[int, str] = {}   # each params model object: its key prefix
        self.classes: set[type] = set()    # their classes, whose attribute reads are recorded

        def walk(obj, prefix):
            self.prefix[id(obj)] = prefix
            self.classes.add(type(obj))
            for name in type(obj).model_fields:
                value = object.__getattribute__(obj, name)
                if hasattr(type(value), "model_fields"):
                    walk(value, f"{prefix}.{name}")

        walk(params.pipeline, "pipeline")
        self.params = params

    def install(self, monkeypatch) -> None:
        from pipeline.params import Params

        recorder = self

        def getattribute(obj, name):
            value = object.__getattribute__(obj, name)
            prefix = recorder.prefix.get(id(obj))
            if prefix is not None:
                if name in type(obj).model_fields:
                    recorder.reads.add(f"{prefix}.{name}")
                elif name == "model_dump":
                    def dump(*args, **kwargs):
                        out = value(*args, **kwargs)
                        recorder.reads.update(f"{prefix}.{k}" for k in out)
                        return out
                    return dump
            return value

        for cls in self.classes:
            monkeypatch.setattr(cls, "__getattribute__", getattribute, raising=False)

        def params_getattribute(obj, name):
            value = object.__getattribute__(obj, name)
            if obj is recorder.params and name == "recipe":
                recorder.reads.add("recipe")
            return value

        monkeypatch.setattr(Params, "__getattribute__", params_getattribute, raising=False)

    def leaves(self) -> set[str]:
        """The read keys, less those read only on the way to a deeper one (``pipeline.eval`` when
        only ``pipeline.eval.batch_size`` was used)."""
        return {k for k in self.reads if not any(o.startswith(k + ".") for o in self.reads)}


def listed(stage: dict) -> list[str]:
    return [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]


def covered(key: str, entries: list[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


@pytest.mark.parametrize("output", ["model"])
def test_every_params_key_a_stage_reads_is_listed_in_dvc_yaml(tiny_models, tmp_path, monkeypatch, output):
    from flows.stages import run_stage
    from pipeline.params import load_params

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = load_params(params_for(tiny_models, tmp_path, output=output, max_shard_size="5GB",
                                    registry={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                              "model_name": "tiny-dvc-params"}))
    work = tmp_path / "dvc"
    work.mkdir()
    monkeypatch.setenv("METAMERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    unlisted: dict[str, set[str]] = {}
    for stage in ("download", "norms", "merge", "evaluate-inputs", "evaluate", "register"):
        with monkeypatch.context() as m:
            rec = Recorder(params)
            rec.install(m)
            run_stage(stage, params, work)
        missing = {k for k in rec.leaves() if not covered(k, listed(dvc[stage]) + exempt(stage))}
        if missing:
            unlisted[stage] = missing
        assert rec.reads, f"{stage}: no read recorded (the recorder is broken)"
    assert not unlisted, f"params keys read but not listed in dvc.yaml: {unlisted}"


def test_the_recorder_sees_reads_and_dumps(tiny_models, tmp_path, monkeypatch):
    """The recorder itself: a field read and a ``model_dump`` are recorded, so an empty result
    above means listed, not unseen."""
    from pipeline.params import load_params

    params = load_params(params_for(tiny_models, tmp_path))
    rec = Recorder(params)
    rec.install(monkeypatch)
    _ = params.pipeline.device
    params.pipeline.eval.model_dump(exclude={"lm_eval"})
    _ = params.recipe
    assert {"pipeline.device", "pipeline.eval.batch_size", "recipe"} <= rec.leaves()
    assert "pipeline.eval.lm_eval" not in rec.reads


def test_params_yaml_has_every_key_dvc_yaml_lists():
    """DVC refuses a listed key that params.yaml lacks: the shipped params.yaml keeps each one,
    even at its default."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        for key in listed(stage):
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    assert not missing, missing
