"""The task-arithmetic family's newer members (breadcrumbs, DELLA) against mergekit, on all three
architectures, float32 compute."""

from __future__ import annotations

import pytest
from parity_helpers import assert_same_tensors, recipe_for, run_both

CASES = {
    "breadcrumbs": ("breadcrumbs", [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.8, "gamma": 0.05},
                                    {"weight": 0.7}], {"density": 0.7}),
    "breadcrumbs_ties": ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "gamma": 0.02},
                                              {"weight": 0.7, "density": 0.9}], {"density": 0.7, "lambda": 0.8}),
    "della": ("della", [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
                        {"weight": 0.7, "density": 0.7}], {"epsilon": 0.15}),
    "della_linear": ("della_linear", [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.5},
                                      {"weight": 0.7, "density": 0.4, "epsilon": 0.2}], {"lambda": 1.1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_matches_mergekit(arch_models, tmp_path, case):
    arch, models = arch_models
    method, per_model, global_params = CASES[case]
    mk, mm = run_both(tmp_path, recipe_for(models, method, per_model, global_params))
    assert_same_tensors(mk, mm, f"{arch}/{case}")
