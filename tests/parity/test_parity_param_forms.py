"""Every form mergekit 0.1.5 accepts for a parameter, in a whole-model recipe, against mergekit:
a scalar, a gradient list (with a YAML numeric string ``1e0`` as an endpoint), one bare
``{filter, value}`` mapping, a list of them (one whose value is a gradient), a filter that matches
nothing (falls through to the global value), numeric strings (``5e-1``: YAML reads it as a string),
and a bool given as ``{value: false}``. The same forms under ``slices`` (per source, per slice) are
in test_parity_slices.py."""

from __future__ import annotations

from parity_helpers import assert_same_tensors, run_both


def test_parameter_forms_match_mergekit(arch_models, tmp_path):
    arch, m = arch_models
    recipe = {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
              "models": [{"model": str(m["ft0"]), "parameters": {"weight": {"filter": "self_attn", "value": 0.3},
                                                                "density": "5e-1"}},
                         {"model": str(m["ft1"]), "parameters": {"weight": [0.2, "1e0"],
                                                                "density": [{"filter": "mlp", "value": [0.2, 0.9]}]}},
                         {"model": str(m["ft2"]), "parameters": {"weight": [{"filter": "nothing", "value": 5}],
                                                                "density": 0.7}}],
              "parameters": {"weight": 0.6, "density": 0.8, "lambda": [0.5, 1.5], "normalize": {"value": False}}}
    mk, mm = run_both(tmp_path, recipe)
    assert_same_tensors(mk, mm, f"{arch}/forms")
