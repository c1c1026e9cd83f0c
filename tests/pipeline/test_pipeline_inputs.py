"""Inputs checked at plan time: evaluation's tokenizers before any merge work, and a hub reference
without a revision pinned to one commit that every later read uses (a local hub cache, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from metamerge.errors import InputError
from pipeline.params import load_params

from models import hub_snapshot
from pipeline_helpers import params_for

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _without_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in TOKENIZER_FILES:
        (dst / f).unlink(missing_ok=True)
    return dst


def test_an_expert_without_tokenizer_fails_before_the_merge(tiny_models, tmp_path, prefect_server):
    from flows.merge_flow import merge_flow

    models = dict(tiny_models, **{"ft-a": _without_tokenizer(tiny_models["ft-a"], tmp_path / "ft-a-notok")})
    params = params_for(models, tmp_path)
    with pytest.raises(InputError) as err:
        merge_flow(params)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"model '{models['ft-a']}' (an expert (evaluated)) has no tokenizer" in msg
    assert "no tokenizer.json, no tokenizer.model, no vocab.json + merges.txt, no vocab.txt" in msg
    out = Path(params["pipeline"]["output_root"])
    # nothing merged, no norms computed
    assert not list(out.rglob("*.safetensors")) and not (out / ".cache").exists()


def test_the_tokenizer_source_is_checked_and_a_symlinked_tokenizer_does_not_count(tiny_models, tmp_path):
    from pipeline import steps
    from pipeline.stages import run_stage

    base = _without_tokenizer(tiny_models["base"], tmp_path / "base-notok")
    (base / "tokenizer.json").symlink_to(tiny_models["base"] / "tokenizer.json")  # a link out of the folder
    params = load_params(params_for(dict(tiny_models, base=base), tmp_path), "p.yaml")
    with pytest.raises(InputError, match=f"p.yaml: model '{base}' \\(the merged model's tokenizer source\\)"):
        run_stage("download", params, tmp_path / "dvc")
    assert not (tmp_path / "dvc" / "pins.json").exists()
    # without evaluation, no tokenizer is needed
    quiet = load_params(params_for(dict(tiny_models, base=base), tmp_path, eval_sets={}, experts={}), "p.yaml")
    steps.check_tokenizers(quiet, {})


def test_a_hub_ref_without_revision_is_pinned_once_and_that_commit_is_read(tiny_models, tmp_path, monkeypatch):
    """``org/tiny-ft`` (no @rev) is pinned to refs/main's commit at plan time; when the branch moves
    before the merge, the merge still reads the pinned commit: its weights equal a merge of that
    commit's files, and the provenance records that commit."""
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from pipeline import steps

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    first, second = "a" * 40, "b" * 40
    hub_snapshot(cache, "org/tiny-ft", first, tiny_models["ft-a"])

    hub = params_for(tiny_models, tmp_path / "hub-run", eval_sets={}, experts={})
    hub["recipe"]["models"][0]["model"] = "org/tiny-ft"
    params = load_params(hub)
    pins = {ref: steps.pin(ref) for ref in steps.input_refs(params)}
    assert pins["org/tiny-ft"]["revision"] == first and pins["org/tiny-ft"]["source"] == "hub"

    hub_snapshot(cache, "org/tiny-ft", second, tiny_models["ft-d"])  # the branch moves to other weights
    assert steps.pin("org/tiny-ft")["revision"] == second
    info = steps.merge(params, pins)

    local = load_params(params_for(tiny_models, tmp_path / "local-run", eval_sets={}, experts={}))
    expected = steps.merge(local, {ref: steps.pin(ref) for ref in steps.input_refs(local)})
    got, want = (load_file(str(Path(i["model_dir"]) / "model.safetensors")) for i in (info, expected))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    prov = json.loads((Path(info["model_dir"]) / "provenance.json").read_text())
    hub_input = next(i for i in prov["inputs"] if i["ref"] == "org/tiny-ft")
    assert hub_input["revision"] == first and hub_input["source"] == "hub"
