"""Tests of modelregistry against a real MLflow SQLite store, with real merges from the engine.

One tiny Llama base and two fine-tunes (base + seeded noise, with an offline-trained BPE tokenizer)
are merged three ways; the three outputs are registered in order into one store (module-scoped:
creating an MLflow database costs seconds) with plain score dicts: a first merge (becomes
champion), a worse one (challenger only) and a better one (takes champion). The store is read back
with ``MlflowClient``. Tests that move aliases run in file order and leave a champion behind.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from metamerge.errors import MergeError

NAME = "tiny-merge"
PROMPT = "the quick"


# --------------------------------------------------------------------------------------------
# fixtures: real models, real merges, one store
# --------------------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    state = base.state_dict()
    for i in (1, 2):
        gen = torch.Generator().manual_seed(i)
        ft = LlamaForCausalLM(config)
        ft.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()})
        ft.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
    return root


RECIPES = {
    "first": "merge_method: metagpt\nname: first\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "worse": ("merge_method: task_arithmetic\nname: worse\nbase_model: {base}\nmodels:\n"
              "  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\n"),
    "better": ("merge_method: metagpt\nname: better\nbase_model: {base}\nparameters:\n  granularity: tensor\n"
               "models:\n  - model: {ft1}\n  - model: {ft2}\n"),
}


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    from metamerge.engine import MergeOptions, merge
    from metamerge.recipe import load_recipe

    root = tmp_path_factory.mktemp("merged")
    out = {}
    for key, template in RECIPES.items():
        recipe_path = root / f"{key}.yaml"
        recipe_path.write_text(template.format(base=models / "base", ft1=models / "ft1", ft2=models / "ft2"))
        out[key] = root / key
        merge(load_recipe(recipe_path), out[key], MergeOptions(progress=False), recipe_text=recipe_path.read_text())
    return out


def _scores(mean, per_task, base=0.5):
    scores = {t: {"exact_match": 0.5 * v, "loss": 2.0 - v, "normalized_score": v, "kind": "completion"}
              for t, v in per_task.items()}
    scores["wiki"] = {"exact_match": None, "loss": 3.1, "perplexity": 22.2}  # a text set: no exact match
    # the unmerged base's averages, as evaluation.summarize writes them: the first version's bar
    objective = {"base": {"average_normalized_exact_match": base, "average_loss_difference": 0.3}}
    return scores, {"mean_normalized_score": mean, "ald": 0.1 / mean, "base": "base", "objective": objective}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from modelregistry.config import RegistryConfig

    db = tmp_path_factory.mktemp("store") / "mlruns.db"
    return RegistryConfig(tracking_uri=f"sqlite:///{db}", experiment_name="registry-tests", model_name=NAME)


@pytest.fixture(scope="module")
def client(config):
    return config.client()


@pytest.fixture(scope="module")
def registered(merged, config, tmp_path_factory):
    from modelregistry.register import register_merge

    extra = tmp_path_factory.mktemp("eval")
    (extra / "eval.csv").write_text("model,arith,qa\nmerged,0.8,0.8\n")
    (extra / "plots").mkdir()
    (extra / "plots" / "lambdas.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (extra / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    lineage = {"prefect_flow_run_id": "flow-run-42", "dvc_lock": str(extra / "dvc.lock"), "trigger": "schedule"}
    plan = [("first", 0.80, {"arith": 0.80, "qa": 0.80}),
            ("worse", 0.60, {"arith": 0.70, "qa": 0.50}),
            ("better", 0.90, {"arith": 0.95, "qa": 0.85})]
    results, client = {}, config.client()
    for key, mean, per_task in plan:
        scores, summary = _scores(mean, per_task)
        results[key] = register_merge(merged[key], scores, summary, lineage, config,
                                      extra_artifacts=[extra / "eval.csv", extra / "plots"])
        # the aliases right after this registration, as read back from the store
        results[key].aliases_after = {a: str(client.get_model_version_by_alias(NAME, a).version)
                                      for a in ("champion", "challenger")}
    return results


def _tags(client, version):
    return client.get_model_version(NAME, str(version)).tags


def _version_run(client, version):
    return client.get_model_version(NAME, str(version)).run_id


def _champion(client):
    return str(client.get_model_version_by_alias(NAME, "champion").version)


# --------------------------------------------------------------------------------------------
# registration and the gate
# --------------------------------------------------------------------------------------------


def test_first_merge_registers_as_champion_with_lineage(registered, merged, client):
    from modelregistry.lineage import git_commit

    res = registered["first"]
    assert res.version == "1" and res.decision.decision == "promoted" and res.promoted
    assert res.aliases_after == {"champion": "1", "challenger": "1"}
    tags = _tags(client, 1)
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.reason"] == "mean_normalized_score 0.8 > the base model's 0.5 - 0 (tolerance)"
    assert tags["promotion.previous_champion"] == "" and tags["promotion.baseline"] == "0.5"

    provenance = json.loads((merged["first"] / "provenance.json").read_text())
    assert tags["git_commit"] == (git_commit() or "unknown")
    assert tags["prefect_flow_run_id"] == "flow-run-42"
    assert re.fullmatch(r"[0-9a-f]{64}", tags["dvc_lock_sha256"])
    assert tags["lineage.trigger"] == "schedule"
    assert tags["recipe_sha256"] == provenance["recipe_sha256"]
    for i, item in enumerate(provenance["inputs"]):
        assert tags[f"input.{i}.revision"] == item["revision"]
        assert json.loads(tags[f"input.{i}.files"]) == item["files"]

    run = client.get_run(res.run_id)
    assert run.data.tags["git_commit"] == tags["git_commit"]
    params, metrics = run.data.params, run.data.metrics
    assert params["method"] == "metagpt" and params["granularity"] == "model" and params["n_models"] == "2"
    assert params["model.0"].endswith("ft1") and params["base"].endswith("base")
    assert params["input.1.revision"] == provenance["inputs"][1]["revision"]
    assert metrics["mean_normalized_score"] == pytest.approx(0.8)
    assert metrics["arith.normalized_score"] == pytest.approx(0.8)
    assert metrics["qa.exact_match"] == pytest.approx(0.4) and metrics["qa.loss"] == pytest.approx(1.2)
    assert metrics["wiki.loss"] == pytest.approx(3.1) and "wiki.exact_match" not in metrics
    assert metrics["ald"] == pytest.approx(0.125)
    assert metrics["baseline.mean_normalized_score"] == 0.5 and metrics["baseline.ald"] == 0.3
    assert metrics["lambda.0"] + metrics["lambda.1"] == pytest.approx(1.0)

    paths = {f.path for f in client.list_artifacts(res.run_id, "merge")}
    assert {"merge/merge_recipe.yaml", "merge/merge_report.json", "merge/provenance.json", "merge/README.md",
            "merge/model_card.md", "merge/lineage.json"} <= paths
    eval_paths = {f.path for f in client.list_artifacts(res.run_id, "eval")}
    assert {"eval/eval.csv", "eval/plots", "eval/scores.json"} <= eval_paths
    card = client.get_model_version(NAME, "1").description
    assert "## Scores" in card and "normalized_score" in card


def test_worse_merge_is_challenger_only(registered, client):
    res = registered["worse"]
    assert res.version == "2" and res.decision.decision == "rejected"
    assert res.aliases_after == {"champion": "1", "challenger": "2"}
    tags = _tags(client, 2)
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.reason"] == "mean_normalized_score 0.6 <= best promoted v1's 0.8 - 0 (tolerance)"
    assert tags["promotion.previous_champion"] == "1"


def test_better_merge_takes_champion(registered, client):
    res = registered["better"]
    assert res.version == "3" and res.promoted
    assert res.aliases_after == {"champion": "3", "challenger": "3"}
    tags = _tags(client, 3)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.previous_champion"] == "1"
    assert tags["promotion.reason"] == "mean_normalized_score 0.9 > best promoted v1's 0.8 - 0 (tolerance)"


def test_rollback_then_manual_promote(registered, client, config, capsys):
    from modelregistry.cli import main as registry_main
    from modelregistry.promotion import promote, rollback

    d = rollback(NAME, config, reason="latency regression")
    assert (d.champion, d.previous_champion) == ("1", "3") and _champion(client) == "1"
    assert _tags(client, 3)["promotion.decision"] == "rolled_back"
    assert "rollback from v3: latency regression" == _tags(client, 1)["promotion.reason"]
    with pytest.raises(MergeError, match="records no previous champion"):
        rollback(NAME, config)  # v1 was the first champion

    # manual override through the registry's CLI, bypassing the gate (v2 was rejected)
    assert registry_main(["promote", NAME, "2", "--reason", "ops choice", "--tracking-uri", config.tracking_uri]) == 0
    assert _champion(client) == "2"
    tags = _tags(client, 2)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.by"] == "manual"
    assert tags["promotion.reason"] == "manual: ops choice" and tags["promotion.previous_champion"] == "1"
    assert registry_main(["rollback", NAME, "--tracking-uri", config.tracking_uri]) == 0
    assert _champion(client) == "1"
    assert registry_main(["rollback", NAME, "--tracking-uri", config.tracking_uri]) == 2
    assert "error:" in capsys.readouterr().err
    assert registry_main(["promote", NAME, "99", "--reason", "x", "--tracking-uri", config.tracking_uri]) == 2
    assert registry_main(["promote", NAME, "3", "--tracking-uri", config.tracking_uri]) == 2  # no reason
    assert "--reason" in capsys.readouterr().err
    with pytest.raises(MergeError, match="give a reason"):
        promote(NAME, "3", "  ", config)

    d = promote(NAME, "3", "restore best", config, user="alice")
    assert d.previous_champion == "1" and _champion(client) == "3"

    # the whole story, in order, from the registry CLI
    capsys.readouterr()
    assert registry_main(["history", NAME, "--json", "--tracking-uri", config.tracking_uri]) == 0
    log = json.loads(capsys.readouterr().out)
    assert [(e["seq"], e["version"], e["result"], e["rule"], e["previous_champion"], e["champion"]) for e in log] == [
        (1, "1", "promoted", "gate", None, "1"), (2, "2", "rejected", "gate", "1", "1"),
        (3, "3", "promoted", "gate", "1", "3"), (4, "3", "rolled_back", "rollback", "3", "1"),
        (5, "2", "promoted", "forced", "1", "2"), (6, "2", "rolled_back", "rollback", "2", "1"),
        (7, "3", "promoted", "forced", "1", "3")]
    assert log[0]["baseline_source"] == "the base model" and log[0]["baseline"] == 0.5
    assert log[1]["compared"] == {"mean_normalized_score": 0.6, "arith.normalized_score": 0.7,
                                  "qa.normalized_score": 0.5, "baseline.mean_normalized_score": 0.5,
                                  "best_promoted.mean_normalized_score": 0.8}
    assert log[3]["reason"] == "rolled back to v1: latency regression"
    assert log[4]["reason"] == "manual: ops choice" and log[6]["user"] == "alice"
    # gate decisions name the flow run that registered the version; decisions by hand name none
    assert [e["flow_run_id"] for e in log] == ["flow-run-42"] * 3 + [None] * 4
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", e["time"]) for e in log)
    assert registry_main(["history", NAME, "--tracking-uri", config.tracking_uri]) == 0
    text = capsys.readouterr().out
    assert "7 decision(s)" in text and "v3  promoted    forced   champion v1 -> v3  by alice" in text
    # the log is also an artifact of the decided version's run
    artifact = Path(client.download_artifacts(_version_run(client, 3), "promotion/history.json"))
    assert [d["seq"] for d in json.loads(artifact.read_text())["decisions"]] == [1, 2, 3, 4, 5, 6, 7]


def test_floor_rejects_despite_higher_mean(registered, merged, config, client):
    from metamerge.engine import MergeOptions, merge
    from metamerge.recipe import load_recipe
    from modelregistry.register import register_merge

    # other weights than the three registered (the same weights would find their version)
    recipe = merged["worse"].parent / "worse.yaml"
    text = recipe.read_text().replace("weight: 0.3", "weight: 0.4").replace("name: worse", "name: floor")
    (merged["worse"].parent / "floor.yaml").write_text(text)
    out = merged["worse"].parent / "floor"
    merge(load_recipe(merged["worse"].parent / "floor.yaml"), out, MergeOptions(progress=False), recipe_text=text)
    strict = config.model_copy(update={"floor": 0.5})
    scores, summary = _scores(0.99, {"arith": 1.6, "qa": 0.38})
    res = register_merge(out, scores, summary, {"git_commit": "0" * 40}, strict)
    assert res.decision.decision == "rejected" and res.decision.below_floor == {"qa": pytest.approx(0.38)}
    tags = _tags(client, res.version)
    assert "below the floor 0.5: qa=0.38" in tags["promotion.reason"]
    assert tags["git_commit"] == "0" * 40
    assert _champion(client) == "3"


def test_the_same_weights_register_once_from_any_path(registered, merged, config, client, tmp_path):
    from modelregistry.register import register_merge

    before = {v.version for v in client.search_model_versions(f"name = '{NAME}'")}
    copy = tmp_path / "elsewhere"
    shutil.copytree(merged["first"], copy)
    (copy / "README.md").write_text("another card, same weights\n")  # side files do not count
    prov = json.loads((copy / "provenance.json").read_text())
    prov["outputs"]["README.md"] = __import__("metamerge.refs").refs.sha256_file(copy / "README.md")
    (copy / "provenance.json").write_text(json.dumps(prov))
    scores, summary = _scores(0.99, {"arith": 0.99, "qa": 0.99})
    res = register_merge(copy, scores, summary, {}, config)  # a rerun, a retry, another folder
    first = registered["first"]
    assert res.duplicate and res.version == first.version and res.run_id == first.run_id
    assert res.tags["content_sha256"] == first.tags["content_sha256"]
    assert {v.version for v in client.search_model_versions(f"name = '{NAME}'")} == before
    assert not first.duplicate


def test_pipeline_entry_point_takes_the_evaluate_summary(merged, config, client):
    """``pipeline.registry_bridge`` calls ``modelregistry.register_merged(model_dir, summary=eval.json, config=...)``."""
    import modelregistry
    from evaluation import TaskScores, summarize

    def ts(loss, em):
        return TaskScores(kind="completion", n=4, n_tokens=20, loss=loss, perplexity=2.0, exact_match=em)

    summary = summarize({"merged": {"arith": ts(1.0, 0.5), "qa": ts(1.5, 0.25)},
                         "base": {"arith": ts(1.2, 0.25), "qa": ts(1.6, 0.25)},
                         "arith": {"arith": ts(0.8, 1.0)}, "qa": {"qa": ts(1.2, 0.5)}}, base="base")
    cfg = config.model_copy(update={"model_name": "tiny-merge-pipeline"})
    result = modelregistry.register_merged(merged["first"], summary=json.loads(json.dumps(summary)), config=cfg)
    assert result["decision"]["decision"] == "promoted" and result["version"] == "1"
    # the base's own mean normalized score (0.25/1 + 0.25/0.5) / 2 was the bar
    assert result["decision"]["champion_value"] == pytest.approx(0.375)
    json.dumps(result)  # JSON-able for the Prefect result store
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["mean_normalized_score"] == pytest.approx(0.5)  # evaluate's average_normalized_exact_match
    assert metrics["qa.normalized_score"] == pytest.approx(0.5) and metrics["arith.exact_match"] == 0.5
    assert metrics["ald"] == pytest.approx(0.25) and metrics["qa.loss_difference"] == pytest.approx(0.3)
    assert metrics["baseline.mean_normalized_score"] == pytest.approx(0.375)
    assert metrics["baseline.ald"] == pytest.approx(0.4)


def test_register_refuses_a_directory_changed_after_the_merge(merged, config, tmp_path):
    from modelregistry.register import register_merge

    copy = tmp_path / "changed"
    shutil.copytree(merged["first"], copy)
    with open(copy / "config.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(MergeError, match="no longer matches its provenance.json.*config.json"):
        register_merge(copy, {}, {}, {}, config)


# --------------------------------------------------------------------------------------------
# audit and reproduce
# --------------------------------------------------------------------------------------------


def test_audit_passes_then_detects_tampering(registered, merged, config, capsys):
    from modelregistry.artifacts import model_files_dir
    from modelregistry.audit import audit
    from modelregistry.cli import main as registry_main

    report = audit(NAME, "2", config)
    provenance = json.loads((merged["worse"] / "provenance.json").read_text())
    assert report["verified"] is True and report["verification"]["checked"] == len(provenance["outputs"])
    assert report["recipe"] == provenance["recipe"] and report["recipe_sha256"] == provenance["recipe_sha256"]
    assert [(i["ref"], i["revision"], i["files"]) for i in report["inputs"]] == \
        [(i["ref"], i["revision"], i["files"]) for i in provenance["inputs"]]
    assert report["project"]["prefect_flow_run_id"] == "flow-run-42"
    assert report["scores"]["qa"]["normalized_score"] == pytest.approx(0.5)
    assert report["summary"]["mean_normalized_score"] == pytest.approx(0.6)
    assert report["promotion"]["decision"] and report["promotion"]["previous_champion"] == "1"

    weights = model_files_dir(NAME, "2", config) / "model.safetensors"
    assert "mlartifacts" in str(weights)  # the registered copy, not the merge output
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    original = weights.read_bytes()
    weights.write_bytes(bytes(data))
    try:
        bad = audit(NAME, "2", config)
        assert bad["verified"] is False
        assert bad["verification"]["mismatched"] == ["model.safetensors"] and not bad["verification"]["missing"]
        assert registry_main(["audit", NAME, "2", "--tracking-uri", config.tracking_uri]) == 1
        out = capsys.readouterr().out
        assert "NOT VERIFIED" in out and "mismatched: model.safetensors" in out
    finally:
        weights.write_bytes(original)
    assert registry_main(["audit", NAME, "2", "--json", "--tracking-uri", config.tracking_uri]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True


def test_reproduce_is_bit_identical_and_checks_inputs(registered, models, config, tmp_path):
    from modelregistry.audit import reproduce

    res = reproduce(NAME, "3", tmp_path / "again", config)
    assert res["identical"] and res["weights"] == ["model.safetensors"]
    assert res["all_files_identical"], res["differing"]

    # an input that changed since the merge is refused, naming the file
    ft1 = str(models / "ft1")
    changed = tmp_path / "ft1-changed"
    shutil.copytree(models / "ft1", changed)
    with open(changed / "generation_config.json", "a") as fh:
        fh.write("\n")
    with pytest.raises(MergeError, match=r"input '.*ft1'.*differs from the recorded.*generation_config.json"):
        reproduce(NAME, "3", tmp_path / "never", config, inputs={ft1: str(changed)})
    assert not (tmp_path / "never").exists()


def test_reproduce_finds_the_shard_layout_of_a_sharded_merge(models, merged, config, tmp_path):
    from metamerge.engine import MergeOptions, merge
    from metamerge.recipe import load_recipe
    from modelregistry.audit import reproduce
    from modelregistry.register import register_merge

    recipe_path = merged["first"].parent / "first.yaml"
    out = tmp_path / "sharded"
    merge(load_recipe(recipe_path), out, MergeOptions(progress=False, max_shard_size=30000),
          recipe_text=recipe_path.read_text())
    assert (out / "model.safetensors.index.json").is_file()
    cfg = config.model_copy(update={"model_name": "tiny-merge-sharded"})
    res = register_merge(out, {}, {}, {}, cfg, gate=False)
    assert res.decision.decision == "registered"
    again = reproduce(cfg.model_name, res.version, tmp_path / "again", cfg)  # max_shard_size not given
    assert again["identical"] and len(again["weights"]) > 2, again["differing"]


# --------------------------------------------------------------------------------------------
# loading from the registry
# --------------------------------------------------------------------------------------------


def _reference_generation(model_dir, prompt, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_champion_loads_from_registry_and_generates(registered, merged, config, client):
    import mlflow

    from modelregistry.config import use_store

    assert _champion(client) == "3"
    with use_store(config):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict([PROMPT, "hello"], params={"max_new_tokens": 6})
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert out[0] == _reference_generation(merged["better"], PROMPT, 6)
    assert out[0] != ""


def test_register_by_reference_logs_a_pointer(merged, config):
    import mlflow

    from modelregistry import model_files_dir, register_merge
    from modelregistry.audit import audit
    from modelregistry.config import use_store

    ref_config = config.model_copy(update={"model_name": "tiny-merge-ref", "register_by_reference": True})
    scores, summary = _scores(0.7, {"arith": 0.7})
    res = register_merge(merged["first"], scores, summary, {}, ref_config)
    assert res.by_reference and res.promoted
    registered_root = Path(ref_config.client().get_model_version_download_uri(ref_config.model_name, res.version))
    assert not list(registered_root.rglob("*.safetensors"))  # weights were not copied
    assert model_files_dir(ref_config.model_name, res.version, ref_config) == merged["first"]
    report = audit(ref_config.model_name, res.version, ref_config)
    assert report["verified"] and report["registered_by_reference"]
    with use_store(ref_config):
        model = mlflow.pyfunc.load_model(f"models:/{ref_config.model_name}@champion")
    assert model.predict(PROMPT, params={"max_new_tokens": 4}) == [_reference_generation(merged["first"], PROMPT, 4)]


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def test_score_metrics_accept_evaluate_summary_names():
    from modelregistry.metrics import score_metrics

    scores = {"math qa": {"exact_match": 0.5, "loss": 1.0, "kind": "completion", "n": 4, "bad": float("nan")}}
    summary = {"average_normalized_exact_match": 0.75, "average_loss_difference": 0.2,
               "normalized_exact_match": {"math qa": 0.75, "text": None}, "loss_difference": {"math qa": 0.2}}
    m = score_metrics(scores, summary)
    assert m == {"math qa.exact_match": 0.5, "math qa.loss": 1.0, "math qa.n": 4.0,
                 "math qa.normalized_score": 0.75, "math qa.loss_difference": 0.2,
                 "mean_normalized_score": 0.75, "ald": 0.2}


def test_git_state_names_the_commit_and_uncommitted_changes(tmp_path):
    import subprocess

    from modelregistry.lineage import git_state

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (repo / "a.txt").write_text("a\n")
    assert git_state(repo / "sub") == (None, True)  # a repository without a commit: not another's
    git("add", "a.txt")
    git("commit", "-q", "-m", "a")
    head = git("rev-parse", "HEAD").strip()
    assert git_state(repo / "sub") == (head, False)
    (repo / "a.txt").write_text("b\n")
    assert git_state(repo) == (head, True)
    assert git_state(tmp_path) == (None, None)


def test_config_defaults(tmp_path, monkeypatch):
    from modelregistry.config import RegistryConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    c = RegistryConfig()
    assert c.tracking_uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert c.artifact_location == str(tmp_path / "mlartifacts")
    assert RegistryConfig(tracking_uri="sqlite:///sub/x.db").artifact_location == str(tmp_path / "sub" / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    c = RegistryConfig()
    assert c.tracking_uri == "http://mlflow.internal:5000" and c.artifact_location is None


def test_model_card_has_hugging_face_front_matter_scores_and_the_real_reproduce_command(registered, merged, client):
    from huggingface_hub import ModelCard

    first = registered["first"]
    card = ModelCard(client.get_model_version(NAME, first.version).description)
    data = card.data.to_dict()
    prov = json.loads((merged["first"] / "provenance.json").read_text())
    refs = [i["ref"] for i in prov["inputs"] if i["role"] in ("base", "model")]
    assert data["base_model"] == refs and data["base_model_relation"] == "merge"
    assert data["merge_method"] == "metagpt" and {"merge", "metamerge", "metagpt"} <= set(data["tags"])
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("arith", "normalized_score")] == pytest.approx(0.80)
    assert results[("wiki", "loss")] == pytest.approx(3.1) and ("wiki", "exact_match") not in results
    assert f"metamerge-registry reproduce {NAME} {first.version} OUT_DIR --tracking-uri sqlite:///" in card.text
    # the card the merge wrote parses too (no scores yet: no model-index)
    plain = ModelCard((merged["first"] / "README.md").read_text()).data.to_dict()
    assert plain["base_model"] == refs and "model-index" not in plain


def test_registry_commands_refuse_a_tracking_uri_without_a_database(registered, config, tmp_path, capsys):
    import argparse

    from modelregistry.cli import build_parser
    from modelregistry.cli import main as registry_main

    typo = tmp_path / "mlrun.db"
    assert registry_main(["audit", NAME, "1", "--tracking-uri", f"sqlite:///{typo}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --tracking-uri sqlite:///{typo}: no such database") and "\n" not in err
    assert not typo.exists() and not (tmp_path / "mlartifacts").exists()  # nothing created
    assert registry_main(["audit", NAME, "1", "--tracking-uri", config.tracking_uri]) == 0
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, *subs.choices.values()):
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help"
