"""``slices:`` recipes (layer stacking, "frankenmerges") against mergekit 0.1.5, on llama (GQA),
qwen2 (tied) and gpt2, float32 compute: the same tensors, the same output layer count, and an
output that loads and runs in transformers.

mergekit writes every tensor of a qwen2 frankenmerge, then fails saving config.json
(transformers 5 refuses ``num_hidden_layers`` != ``len(layer_types)``); for qwen2 the tensors are
compared and the failure is checked to be exactly that one. metamerge rebuilds ``layer_types``.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from mergekit_runner import MergekitError, run_mergekit
from parity_helpers import assert_same_tensors, load_dir

LAYERS = 3  # every parity model has 3 layers


def src(models, name, start, end, **params):
    return {"model": str(models[name]), "layer_range": [start, end], **({"parameters": params} if params else {})}


def stack(m):
    """(a) a frankenmerge: one source per slice, weight 1, five layers out of three, one repeated."""
    return {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
            "slices": [{"sources": [src(m, "ft0", 0, 2)]}, {"sources": [src(m, "ft1", 1, 3)]},
                       {"sources": [src(m, "ft0", 2, 3)]}]}


def task_arithmetic(m):
    """(b) two fine-tunes and the base per slice, layers from different depths, per-source and
    slice parameters (a gradient, a filter whose value is a gradient, a gradient lambda)."""
    return {"merge_method": "task_arithmetic", "base_model": str(m["base"]), "dtype": "float32",
            "parameters": {"normalize": True},
            "slices": [
                {"sources": [src(m, "base", 0, 2), src(m, "ft0", 0, 2, weight=0.7),
                             src(m, "ft1", 1, 3, weight=[0.2, 0.9])]},
                {"sources": [src(m, "base", 1, 3), src(m, "ft2", 0, 2, weight=[{"filter": "mlp", "value": 0.4},
                                                                              {"value": [1.0, 0.1]}]),
                             src(m, "ft1", 1, 3)],
                 "parameters": {"weight": 0.3, "lambda": [0.5, 1.5]}}]}


def gradient(m):
    """(c) gradients across slices: t runs over each slice (3 layers: 0, 0.5, 1; 1 layer: 1); a
    global filter list matched against the name each model is read under (``layers.2.`` is source
    layer 2, output layers 2 and 3), with a YAML numeric string ``1e-1``."""
    return {"merge_method": "linear", "dtype": "float32",
            "parameters": {"weight": [{"filter": "layers.2.", "value": 3.0},
                                      {"filter": "self_attn", "value": [1, 2, 5]}, {"value": "1e-1"}]},
            "slices": [{"sources": [src(m, "ft0", 0, 3, weight=[0.1, 1.0]), src(m, "ft1", 0, 3)]},
                       {"sources": [src(m, "ft2", 1, 2, weight=[0.1, 1.0]), src(m, "ft1", 2, 3)]}]}


def ties_slice_base(m):
    """ties with a slice of only the base (its layers as they are), a slice-level base_model and a
    density gradient; the final norm and lm_head come from the last slice, over as many of its
    sources as the first slice has (mergekit's zip)."""
    return {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
            "parameters": {"weight": 0.8, "density": [0.3, 0.9]},
            "slices": [{"sources": [src(m, "base", 0, 2), src(m, "ft0", 0, 2)]},
                       {"sources": [src(m, "base", 2, 3)]},
                       {"base_model": str(m["ft1"]),
                        "sources": [src(m, "ft1", 1, 3), src(m, "ft2", 0, 2), src(m, "ft0", 1, 3)]}]}


def dare_order(m):
    """dare_linear: masks drawn in mergekit's order (by source tensor name) from --random-seed."""
    return {"merge_method": "dare_linear", "base_model": str(m["base"]), "dtype": "float32",
            "parameters": {"weight": 0.8, "density": 0.5},
            "slices": [{"sources": [src(m, "base", 0, 2), src(m, "ft0", 0, 2), src(m, "ft1", 0, 2)]},
                       {"sources": [src(m, "base", 2, 3), src(m, "ft2", 2, 3), src(m, "ft1", 2, 3)]}]}


def out_layers(recipe) -> int:
    return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in recipe["slices"])


def run_slices(tmp_path, recipe, arch):
    """The recipe through both tools: their tensors and config.json (mergekit's is None where it
    fails on a layer count that changed under qwen2's ``layer_types``, after writing the tensors)."""
    from metamerge.cli import main as metamerge_main

    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    mk_config = None
    try:
        run_mergekit(rpath, tmp_path / "mk", extra_args=("--no-write-model-card",), seed=0)
        mk_config = json.loads((tmp_path / "mk" / "config.json").read_text())
    except MergekitError as exc:
        changed = out_layers(recipe) != LAYERS
        if not (arch == "qwen2" and changed and "must be equal to the number of `layer_types`" in str(exc)):
            raise
    assert metamerge_main(["merge", str(rpath), str(tmp_path / "mm"), "--no-progress"]) == 0
    mm_config = json.loads((tmp_path / "mm" / "config.json").read_text())
    return load_dir(tmp_path / "mk"), load_dir(tmp_path / "mm"), mk_config, mm_config


def check_config(arch, recipe, mk_config, mm_config):
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert mm_config[key] == out_layers(recipe)
    if mk_config is not None:
        assert mm_config[key] == mk_config[key]
        assert {k: v for k, v in mm_config.items() if k != "transformers_version"} == \
               {k: v for k, v in mk_config.items() if k != "transformers_version"}
    if "layer_types" in mm_config:
        assert len(mm_config["layer_types"]) == mm_config[key]


def check_loads_and_runs(path, n_layers):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == n_layers
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2, 7]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()


CASES = {"stack": stack, "task_arithmetic": task_arithmetic, "gradient": gradient}


@pytest.mark.parametrize("case", sorted(CASES))
def test_slices_match_mergekit(arch_models, tmp_path, case):
    arch, models = arch_models
    recipe = CASES[case](models)
    mk, mm, mk_config, mm_config = run_slices(tmp_path, recipe, arch)
    assert_same_tensors(mk, mm, f"{arch}/{case}")
    check_config(arch, recipe, mk_config, mm_config)
    if case == "stack":
        assert out_layers(recipe) > LAYERS
        check_loads_and_runs(tmp_path / "mm", out_layers(recipe))


@pytest.mark.parametrize("case", [ties_slice_base, dare_order], ids=["ties_slice_base", "dare_order"])
def test_slices_quirks_match_mergekit(all_arch_models, tmp_path, case):
    """On llama only (one architecture is enough for what the planner decides, not the layout)."""
    recipe = case(all_arch_models["llama"])
    mk, mm, mk_config, mm_config = run_slices(tmp_path, recipe, "llama")
    assert_same_tensors(mk, mm, f"llama/{case.__name__}")
    check_config("llama", recipe, mk_config, mm_config)
