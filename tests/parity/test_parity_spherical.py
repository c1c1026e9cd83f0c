"""The spherical methods (slerp, nuslerp, multislerp, karcher) against mergekit 0.1.5, on all three
architectures, float32 compute: the same recipe must give the same tensors.

Cases cover each method's parameters with non-default values, per-model weights, gradient lists
over the layers and ``{filter, value}`` lists (``attn`` matches llama/qwen2 ``self_attn`` and
gpt2 ``attn``), with and without a base, and the base listed under ``models`` or not.
"""

from __future__ import annotations

import pytest
import torch
from parity_helpers import assert_same_tensors, load_dir, recipe_for, run_both

ATTN_T = [{"filter": "attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.7}, {"value": 0.4}]


def slerp_between_finetunes(models, t):
    """base_model ft1 listed second: ft1 is still the first endpoint (t = 0)."""
    recipe = recipe_for(models, "slerp", [None, None], {"t": t}, base=False)
    recipe = {"merge_method": "slerp", "base_model": str(models["ft1"]), **recipe}
    return recipe


CASES = {
    # slerp: base_model -> one fine-tune (the base not listed: mergekit appends it)
    "slerp_scalar": lambda m: recipe_for(m, "slerp", [None], {"t": 0.3}),
    "slerp_gradient": lambda m: slerp_between_finetunes(m, [0, 0.5, 1]),
    "slerp_filter": lambda m: recipe_for(m, "slerp", [None], {"t": ATTN_T}),
    # nuslerp: two task vectors around a base, or two models
    "nuslerp_base": lambda m: recipe_for(m, "nuslerp", [{"weight": 1.0}, {"weight": 0.5}]),
    "nuslerp_rows": lambda m: recipe_for(m, "nuslerp", [{"weight": 0.3}, {"weight": 0.7}],
                                         {"nuslerp_flatten": False}, base=False),
    "nuslerp_columns": lambda m: recipe_for(m, "nuslerp", [{"weight": [0.2, 0.8]}, {"weight": 0.5}],
                                            {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp_filter": lambda m: recipe_for(m, "nuslerp", [{"weight": [{"filter": "mlp", "value": 2.0},
                                                                      {"value": 1.0}]}, None],
                                           {"weight": 0.6}, base=False),
    # multislerp: any number of models, optional base
    "multislerp": lambda m: recipe_for(m, "multislerp", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}],
                                       base=False),
    "multislerp_base": lambda m: recipe_for(m, "multislerp", [{"weight": [0.2, 0.9]}, {"weight": 0.3},
                                                              {"weight": ATTN_T}],
                                            {"normalize_weights": False, "eps": 1e-6}),
    # karcher: every input equal weight; a base_model is one more input
    "karcher": lambda m: recipe_for(m, "karcher", [None, None, None], base=False),
    "karcher_base": lambda m: recipe_for(m, "karcher", [None, None], {"max_iter": 3, "tol": 1e-6}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spherical_matches_mergekit(arch_models, tmp_path, case):
    arch, models = arch_models
    mk, mm = run_both(tmp_path, CASES[case](models))
    assert_same_tensors(mk, mm, f"{arch}/{case}")


def far_from(out: dict, other: dict, label: str) -> None:
    """Some tensor of ``out`` differs from ``other`` (cast to float32) by far more than a rounding step."""
    worst = max(float((out[n].double() - other[n].float().double()).abs().max()) for n in out)
    assert worst > 1e-3, f"{label}: the merge is within {worst:.3g} of it"


def test_control_not_vacuous(arch_models, tmp_path):
    """mergekit's slerp is neither an input nor the straight line between the endpoints: a parity
    check of it would catch a metamerge that returned either."""
    arch, models = arch_models
    t = 0.3
    mk, mm = run_both(tmp_path, recipe_for(models, "slerp", [None], {"t": t}))
    assert_same_tensors(mk, mm, f"{arch}/control")
    base, ft0 = load_dir(models["base"]), load_dir(models["ft0"])
    far_from(mk, base, "base")
    far_from(mk, ft0, "ft0")
    lerp = {n: (1 - t) * base[n].float() + t * ft0[n].float() for n in mk}
    far_from(mk, lerp, "lerp")
    with pytest.raises(AssertionError):
        assert_same_tensors(mk, {n: v.to(torch.float32) for n, v in lerp.items()}, "lerp")
