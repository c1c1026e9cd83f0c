"""The raw-tensor methods ``model_stock``, ``arcee_fusion``, ``nearswap`` and ``passthrough`` (a
``models:`` recipe with one model) against mergekit 0.1.5 on all three architectures, float32 compute;
a control that the comparisons are not vacuous; and arcee_fusion's sampled quartiles (tensors above
one million elements) under mergekit's ``--random-seed``. Unit checks against float64 formulas:
tests/test_methods_raw.py.

The fine-tunes are the base plus noise of scale 0.01, 0.02, 0.03 (``attn`` matches llama/qwen2
``self_attn`` and gpt2 ``attn``; ``mlp`` matches all three).
"""

from __future__ import annotations

import pytest
import torch
from parity_helpers import assert_same_tensors, load_dir, recipe_for, run_both

ATTN_MLP = [{"filter": "attn", "value": 0.02}, {"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.01}]


def listed_base(recipe: dict, models: dict) -> dict:
    """The same recipe with the base also listed (first, without parameters), as mergekit recipes often do."""
    return {**recipe, "models": [{"model": str(models["base"])}, *recipe["models"]]}


def one_model(models: dict, parameters: dict | None = None, global_params: dict | None = None) -> dict:
    return recipe_for(models, "passthrough", [parameters], global_params, base=False)


CASES = {
    # model_stock: the base and at least two fine-tunes
    "model_stock": lambda m: recipe_for(m, "model_stock", [None, None, None]),
    "model_stock_filter_wise": lambda m: listed_base(recipe_for(m, "model_stock", [None, None],
                                                                {"filter_wise": True}), m),
    "model_stock_filter_list": lambda m: recipe_for(m, "model_stock", [None, None, None], {
        "filter_wise": [{"filter": "attn", "value": True}, {"value": False}]}),
    # arcee_fusion: the base and one fine-tune (all tensors here are below mergekit's sampling size)
    "arcee_fusion": lambda m: recipe_for(m, "arcee_fusion", [None]),
    "arcee_fusion_listed_base": lambda m: listed_base(recipe_for(m, "arcee_fusion", [None]), m),
    # nearswap: the base and one fine-tune, t a scalar, a gradient over the layers, a filter list
    "nearswap": lambda m: recipe_for(m, "nearswap", [None], {"t": 0.01}),
    "nearswap_gradient": lambda m: recipe_for(m, "nearswap", [None], {"t": [0.0, 0.02, 0.05]}),
    "nearswap_filter": lambda m: listed_base(recipe_for(m, "nearswap", [None], {"t": ATTN_MLP}), m),
    # passthrough: one model, as it is or scaled per tensor
    "passthrough": lambda m: one_model(m),
    "passthrough_scale_filter": lambda m: one_model(m, {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                  {"filter": "c_proj", "value": 0.0},
                                                                  {"filter": "mlp", "value": [0.5, 2.0]},
                                                                  {"value": 1.0}]}),
    "passthrough_scale_global": lambda m: one_model(m, None, {"scale": [{"filter": "attn", "value": 0.25}]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_raw_methods_match_mergekit(arch_models, tmp_path, case):
    arch, models = arch_models
    mk, mm = run_both(tmp_path, CASES[case](models))
    assert_same_tensors(mk, mm, f"{arch}/{case}")


def test_passthrough_slices_match_mergekit(arch_models, tmp_path):
    """passthrough's usual recipe, a slices frankenmerge: a source's ``scale`` filters match the
    name each tensor is read under. (Three output layers, as the inputs have: mergekit keeps qwen2's
    ``layer_types`` as they were, so another count fails to load in mergekit itself.)"""
    arch, m = arch_models
    scale = [{"filter": "o_proj", "value": 0.0}, {"filter": "c_proj", "value": 0.0},
             {"filter": "mlp", "value": [0.5, 2.0]}, {"value": 1.0}]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(m["ft0"]), "layer_range": [2, 3]}]},
        {"sources": [{"model": str(m["ft1"]), "layer_range": [0, 2], "parameters": {"scale": scale}}]}]}
    mk, mm = run_both(tmp_path, recipe)
    assert_same_tensors(mk, mm, f"{arch}/passthrough_slices")


def worst_diff(out: dict, other: dict, names=None) -> float:
    return max(float((out[n].double() - other[n].float().double()).abs().max()) for n in (names or out))


def test_control_not_vacuous(arch_models, tmp_path):
    """Each method's output is none of its inputs (so a parity check would catch a metamerge that
    returned one), and the parity check does catch a plausible near miss of each."""
    arch, models = arch_models
    inputs = {k: load_dir(p) for k, p in models.items()}
    outs = {}
    for case in ("model_stock", "arcee_fusion", "nearswap", "passthrough_scale_filter"):
        (tmp_path / case).mkdir()
        mk, mm = run_both(tmp_path / case, CASES[case](models))
        assert_same_tensors(mk, mm, f"{arch}/{case}")
        outs[case] = mk
    for case in ("model_stock", "arcee_fusion", "nearswap"):
        for label in ("base", "ft0", "ft1", "ft2"):
            assert worst_diff(outs[case], inputs[label]) > 1e-3, f"{arch}/{case} is {label}"
    # arcee_fusion takes some but not all of ft0's elements
    fused = outs["arcee_fusion"]
    took = sum(int((fused[n] == inputs["ft0"][n].float()).sum()) for n in fused)
    kept = sum(int((fused[n] == inputs["base"][n].float()).sum()) for n in fused)
    total = sum(t.numel() for t in fused.values())
    assert 0 < took < total and 0 < kept < total, (took, kept, total)
    # model_stock is not the fine-tunes' plain average
    stock = outs["model_stock"]
    average = {n: sum(inputs[f"ft{i}"][n].float() for i in range(3)) / 3 for n in stock}
    assert worst_diff(stock, average) > 1e-3
    # passthrough: o_proj/c_proj zeroed, other attention tensors as they were
    scaled = outs["passthrough_scale_filter"]
    zeroed = [n for n in scaled if "o_proj" in n or "c_proj" in n]
    assert zeroed and all(not scaled[n].any() for n in zeroed)
    same = [n for n in scaled if "attn" in n and n not in zeroed]
    assert same and all(torch.equal(scaled[n], inputs["ft0"][n].float()) for n in same)
    with pytest.raises(AssertionError):
        assert_same_tensors(scaled, {n: v.float() for n, v in inputs["ft0"].items() if n in scaled}, "unscaled")


def build_wide_llama(root, vocab: int = 32768):
    """A llama whose embeddings and lm_head have over a million elements (mergekit then samples the
    quartiles), base and one fine-tune."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(7)
    state = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.state_dict().items()}
    base.load_state_dict(state)
    base.save_pretrained(root / "ft0")
    return {"base": root / "base", "ft0": root / "ft0"}


@pytest.mark.parametrize("seed", [0, 5])
def test_arcee_fusion_sampled_quartiles_follow_the_seed(tmp_path, seed):
    """Above one million elements mergekit sorts a random sample of one million importances; with
    ``--random-seed S`` and ``seed: S`` the masks are the same (embed_tokens and lm_head: two
    draws, in mergekit's order)."""
    models = build_wide_llama(tmp_path / "models")
    recipe = recipe_for(models, "arcee_fusion", [None], {"seed": seed})
    (tmp_path / "run").mkdir()
    mk, mm = run_both(tmp_path / "run", recipe, seed=seed)
    assert mk["lm_head.weight"].numel() > 1_000_000
    assert_same_tensors(mk, mm, f"seed {seed}")
    if seed:  # another seed gives other masks: the sample matters
        (tmp_path / "other").mkdir()
        other = run_both(tmp_path / "other", {**recipe, "parameters": {"seed": 0}}, seed=0)[0]
        assert not torch.equal(other["lm_head.weight"], mk["lm_head.weight"])
