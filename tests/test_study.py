"""The study's pure parts: the table, the oracle choice, the linearity measure, the recipes."""

from __future__ import annotations

import pytest

from evaluation import study
from metamerge.recipe import parse_recipe


def test_markdown_table_has_average_and_dashes():
    text = study.markdown_table({"a": {"x": 0.5, "y": 1.0}, "b": {"x": None, "y": 0.25}}, ["x", "y"])
    lines = text.splitlines()
    assert lines[0] == "| method | x | y | average |"
    assert lines[2] == "| a | 0.500 | 1.000 | 0.750 |"
    assert lines[3] == "| b | - | 0.250 | 0.250 |"


def test_pick_oracle_takes_best_average_and_first_on_ties():
    grid = {"g_0.1": {"x": 0.2, "y": 0.4}, "g_0.3": {"x": 0.5, "y": 0.5}, "g_0.5": {"x": 0.6, "y": 0.4}}
    assert study.pick_oracle(grid) == "g_0.3"  # 0.5 == 0.5: the first listed wins
    grid["g_1"] = {"x": 0.9, "y": None}
    assert study.pick_oracle(grid) == "g_1"


def test_linearity_error_zero_on_a_line_and_half_for_a_tent():
    assert study.linearity_error([0, 0.5, 1], [1.0, 2.0, 3.0]) == pytest.approx(0.0)
    # chord from 1 to 3; midpoint 3 instead of 2: gap 1 over a rise of 2
    assert study.linearity_error([0, 0.5, 1], [1.0, 3.0, 3.0]) == pytest.approx(0.5)


def test_every_study_recipe_is_valid_and_the_comparison_is_complete():
    recipes = {**study.study_recipes("/b", ["/f1", "/f2"]), **study.grid_recipes("/b", ["/f1", "/f2"], (0.3, 1.0))}
    for name, r in recipes.items():
        parse_recipe(r, name)  # raises on anything invalid
    methods = {r["merge_method"] for r in recipes.values()}
    assert methods == {"metagpt", "task_arithmetic", "ties", "dare_ties", "linear", "dare_linear", "breadcrumbs",
                       "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl", "multislerp",
                       "karcher", "model_stock"}
    sparsified = {r.get("parameters", {}).get("sparsify") for r in recipes.values() if r["merge_method"] == "metagpt"}
    assert sparsified == {None, "dare", "ties", "breadcrumbs", "della"}
    assert recipes["task_arithmetic_0.3"]["parameters"]["lambda"] == 0.3
    assert "base_model" not in recipes["linear"]  # the paper's weight average of the fine-tunes


def test_output_linearity_error_zero_on_a_line_and_exact_on_a_tent():
    line = [[1.0, 2.0], [2.0, 2.5], [3.0, 3.0]]  # z0 + alpha * (2, 1)
    assert study.output_linearity_error([0, 0.5, 1], line) == (0.0, [0.0, 0.0, 0.0])
    # at alpha 0.5 the chord is (1, 0); the output is (1, 1): off by 1, over ||z1 - z0|| = 2
    assert study.output_linearity_error([0, 0.5, 1], [[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]) == (0.5, [0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="from 0 to 1"):
        study.output_linearity_error([0.1, 1], [[0.0], [1.0]])


def test_output_linearity_of_real_models(tmp_path):
    """A fine-tune that changes only lm_head has logits exactly linear in alpha (error ~ float32
    rounding); one that changes an attention layer does not."""
    import torch

    from models import build_tokenizer, make_model, perturb, save

    base = make_model("llama", seed=0)
    save(base, tmp_path / "base", dtype=torch.float32, tokenizer=build_tokenizer())
    head = perturb(base, seed=1, scale=0.5, skip=lambda n: n != "lm_head.weight")
    save(head, tmp_path / "head", dtype=torch.float32, tokenizer=build_tokenizer())
    attn = perturb(base, seed=2, scale=0.5, skip=lambda n: "layers.0.self_attn" not in n)
    save(attn, tmp_path / "attn", dtype=torch.float32, tokenizer=build_tokenizer())
    examples = [{"prompt": "w5 w6 w7", "completion": " w8 w9"}, {"prompt": "w10", "completion": " w11"}]
    linear, errs = study.output_linearity(tmp_path / "base", tmp_path / "head", examples)
    assert linear < 1e-5 and len(errs) == len(study.ALPHAS)
    curved, errs = study.output_linearity(tmp_path / "base", tmp_path / "attn", examples)
    assert curved > 1e-3 and errs[0] == 0.0 and errs[-1] < 1e-12
