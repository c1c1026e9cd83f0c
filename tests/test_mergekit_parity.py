"""Parity with mergekit itself: the same recipe, run by `mergekit-yaml` (0.1.5, in its own venv,
float32 compute) and by `metamerge merge`, gives the same tensors, bit for bit.

The mergekit venv is created by `make test` (bench/mergekit_runner.py). Without it these tests
are skipped with the reason, never passed silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from metamerge.cli import main as metamerge_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mergekit_runner import find_mergekit, run_mergekit  # noqa: E402

MERGEKIT = find_mergekit()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit venv missing: run `make test` (it builds .venv-mergekit)")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny bf16 Llama base and three fine-tunes with updates of different sizes."""
    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, dtype="bfloat16")
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        sd = {k: (v.float() + 0.01 * (i + 1) * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
              for k, v in base.state_dict().items()}
        ft = LlamaForCausalLM(cfg).to(torch.bfloat16)
        ft.load_state_dict(sd)
        paths[f"ft{i}"] = root / f"ft{i}"
        ft.save_pretrained(paths[f"ft{i}"])
    return paths


def _recipe(models, method, per_model, global_params=None, **top):
    recipe = {"merge_method": method, "base_model": str(models["base"]),
              "models": [{"model": str(models[f"ft{i}"]), **({"parameters": p} if p else {})}
                         for i, p in enumerate(per_model)],
              "dtype": "float32", **top}
    if global_params:
        recipe["parameters"] = global_params
    return recipe


CASES = {
    "task_arithmetic": ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}], {"lambda": 0.3}, {}),
    "task_arithmetic_normalize": ("task_arithmetic", [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}],
                                  {"normalize": True}, {}),
    "ties": ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.3}, {"weight": 0.8}],
             {"lambda": 0.9}, {}),
    "ties_global_density_filter": ("ties", [{"weight": [{"filter": "self_attn", "value": 0.4}, {"value": 1.0}]},
                                            {"weight": 0.6}, {"weight": 0.8, "density": 0.2}],
                                   {"density": 0.55}, {"out_dtype": "bfloat16"}),
    "ties_gradient": ("ties", [{"weight": [0.0, 1.0], "density": 0.5}, {"weight": 0.6, "density": [0.9, 0.1]},
                               {"weight": 0.8}], None, {}),
    "dare_linear": ("dare_linear", [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7},
                                    {"weight": 0.4, "density": 0.9}], None, {}),
    "dare_ties": ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7},
                                {"weight": 0.4}], {"lambda": 1.2}, {}),
    "dare_ties_no_rescale": ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7},
                                           {"weight": 0.4, "density": 0.3}], {"rescale": False}, {}),
}


def _run_both(tmp_path, recipe) -> tuple[dict, dict]:
    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_mergekit(rpath, tmp_path / "mk", extra_args=("--no-write-model-card",), seed=0)
    assert metamerge_main(["merge", str(rpath), str(tmp_path / "mm"), "--no-progress"]) == 0
    mk = {}
    for f in sorted((tmp_path / "mk").glob("*.safetensors")):
        mk.update(load_file(f))
    mm = {}
    for f in sorted((tmp_path / "mm").glob("*.safetensors")):
        mm.update(load_file(f))
    return mk, mm


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(models, tmp_path, case):
    method, per_model, global_params, top = CASES[case]
    mk, mm = _run_both(tmp_path, _recipe(models, method, per_model, global_params, **top))
    assert sorted(mk) == sorted(mm)
    for name in mk:
        assert mk[name].dtype == mm[name].dtype, name
        assert torch.equal(mk[name], mm[name]), f"{case}: {name} differs (max {float((mk[name].float() - mm[name].float()).abs().max())})"


def test_linear_same_as_mergekit(models, tmp_path):
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(models["base"]), "parameters": {"weight": 0.5}},
                         {"model": str(models["ft0"]), "parameters": {"weight": 0.3}},
                         {"model": str(models["ft2"]), "parameters": {"weight": 0.45}}]}
    mk, mm = _run_both(tmp_path, recipe)
    for name in mk:
        assert torch.equal(mk[name], mm[name]), name


def test_dare_depends_on_seed(models, tmp_path):
    """A control for the DARE cases: mergekit with another seed differs, so equality above is earned."""
    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump(_recipe(models, *CASES["dare_linear"][:2])))
    run_mergekit(rpath, tmp_path / "a", extra_args=("--no-write-model-card",), seed=0)
    run_mergekit(rpath, tmp_path / "b", extra_args=("--no-write-model-card",), seed=1)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
