"""``sce``, ``ram`` and ``ramplus_tl`` against mergekit 0.1.5 on all three architectures, float32 compute, and a
control that the comparison is not vacuous (unit checks against float64 formulas: tests/test_methods_sce_ram.py).

The fine-tunes are the base plus noise of scale 0.01, 0.02, 0.03, so an ``epsilon`` near 0.015 splits
RAM's entries into unique, shared and untouched ones in every tensor.
"""

from __future__ import annotations

import pytest
import torch
from parity_helpers import assert_same_tensors, build_models, load_dir, recipe_for, run_both

NONE3 = [None, None, None]

CASES = {
    # select the top 60% by variance everywhere; int8_mask changes only mergekit's mask storage
    "sce_topk": ("sce", NONE3, {"select_topk": 0.6, "int8_mask": True}),
    # attention by filter, the rest a gradient over the layers that reaches 1 (no selection) at the top
    "sce_filter_gradient": ("sce", NONE3, {"select_topk": [{"filter": "self_attn", "value": 0.3},
                                                           {"filter": "attn", "value": 0.4},
                                                           {"value": [0.5, 0.75, 1.0]}]}),
    "ram_epsilon": ("ram", NONE3, {"epsilon": 0.015}),
    "ram_gradient": ("ram", NONE3, {"epsilon": [0.005, 0.02, 0.03]}),
    "ramplus_tl": ("ramplus_tl", NONE3, {"r": 0.5, "alpha": 2.0, "epsilon": 0.015}),
    "ramplus_tl_filter_gradient": ("ramplus_tl", NONE3, {
        "r": [{"filter": "self_attn", "value": 0.7}, {"filter": "attn", "value": 0.6}, {"value": 0.3}],
        "alpha": [0.5, 3.0], "epsilon": [0.01, 0.02]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sce_ram_match_mergekit(arch_models, tmp_path, case):
    arch, models = arch_models
    method, per_model, global_params = CASES[case]
    mk, mm = run_both(tmp_path, recipe_for(models, method, per_model, global_params))
    assert_same_tensors(mk, mm, f"{arch}/{case}")


def test_comparison_is_not_vacuous(tmp_path):
    """On llama: each method's output differs from the base, from every input and from the others';
    epsilon 0.015 leaves entries no fine-tune, one, and several contribute to."""
    models = build_models(tmp_path / "models", "llama")
    inputs = {k: load_dir(p) for k, p in models.items()}
    name = "model.layers.1.mlp.down_proj.weight"
    taus = torch.stack([inputs[f"ft{i}"][name].float() - inputs["base"][name].float() for i in range(3)])
    counts = (taus.abs() > 0.015).sum(dim=0)
    assert all(bool((counts == c).any()) for c in (0, 1, 2, 3))
    outs = {}
    for case in ("sce_topk", "ram_epsilon", "ramplus_tl"):
        method, per_model, global_params = CASES[case]
        (tmp_path / case).mkdir()
        mk, mm = run_both(tmp_path / case, recipe_for(models, method, per_model, global_params))
        assert_same_tensors(mk, mm, case)
        outs[case] = mm
    for case, out in outs.items():
        for label, state in inputs.items():
            diff = (out[name].float() - state[name].float()).abs().max().item()
            assert diff > 1e-3, f"{case} equals {label} on {name}"
    assert not torch.equal(outs["ram_epsilon"][name], outs["ramplus_tl"][name])
    assert not torch.equal(outs["ram_epsilon"][name], outs["sce_topk"][name])
