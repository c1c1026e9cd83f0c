"""How a method's parameters resolve per tensor (metamerge.methods.base), mergekit's rules."""

from __future__ import annotations

import pytest

from metamerge.errors import MergeError
from metamerge.methods.base import Param, evaluate_setting, layer_fraction

# ------------------------------------------------------------------------------ layer_fraction


@pytest.mark.parametrize("name, n, expected", [
    ("model.layers.0.mlp.up_proj.weight", 4, 0.0),
    ("model.layers.1.mlp.up_proj.weight", 4, 1 / 3),
    ("model.layers.3.self_attn.q_proj.weight", 4, 1.0),
    ("model.layers.10.input_layernorm.weight", 11, 1.0),   # two digits
    ("transformer.h.2.attn.c_attn.weight", 5, 0.5),        # GPT-2
    ("encoder.block.1.layer.0.weight", 3, 0.5),            # the first match wins: block 1
    ("blocks.2.attn.weight", 5, 0.5),                      # at the start of the name
    ("model.layer.6.weight", 7, 1.0),
])
def test_layer_fraction_is_index_over_n_minus_1(name, n, expected):
    assert layer_fraction(name, n) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "transformer.wte.weight",
    "model.sublayers.2.weight",    # 'layers' must be a whole component
    "model.layers.x.weight",       # no index
])
def test_layer_fraction_outside_the_stack_is_zero(name):
    assert layer_fraction(name, 4) == 0.0


@pytest.mark.parametrize("n", [None, 0])
def test_layer_fraction_without_layer_count_is_zero(n):
    assert layer_fraction("model.layers.3.mlp.weight", n) == 0.0


def test_layer_fraction_single_layer_is_one():
    assert layer_fraction("model.layers.0.mlp.weight", 1) == 1.0


# ------------------------------------------------------------------------------ evaluate_setting

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("value", [0.5, 3, "tensor", True, None])
def test_scalar_is_returned_as_is(value):
    assert evaluate_setting(value, NAME, 0.7) == value


def test_a_single_mapping_is_a_one_condition_list():
    """mergekit accepts one bare ``{filter, value}`` mapping where a list of them may stand."""
    assert evaluate_setting({"filter": "mlp", "value": 0.25}, NAME, 0.7) == 0.25
    assert evaluate_setting({"filter": "self_attn", "value": 0.25}, NAME, 0.7) is None


@pytest.mark.parametrize("value, t, expected", [
    ([0, 1], 0.25, 0.25),
    ([0.0, 1.0, 0.5], 0.75, 0.75),      # halfway between 1.0 and 0.5
    ([1, 3, 2, 6], 0.5, 2.5),           # halfway between 3 and 2
    ([1, 3, 2, 6], 1 / 3, 3.0),         # exactly on the second point
    ([1, 3, 2, 6], 0.0, 1.0),
    ([1, 3, 2, 6], 1.0, 6.0),           # the last point, no index past the end
    ([2], 0.8, 2.0),
])
def test_gradient_list_interpolates_linearly(value, t, expected):
    assert evaluate_setting(value, NAME, t) == pytest.approx(expected, rel=1e-12)


FILTERS = [
    {"filter": "mlp", "value": 0.1},
    {"filter": "self_attn", "value": 0.2},
    {"value": 0.3},
]


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.mlp.up_proj.weight", 0.1),
    ("model.layers.0.self_attn.q_proj.weight", 0.2),
    ("model.embed_tokens.weight", 0.3),       # no filter matches all
])
def test_filter_list_picks_the_matching_value(name, expected):
    assert evaluate_setting(FILTERS, name, 0.0) == expected


def test_filter_list_first_match_wins():
    value = [{"filter": "layers", "value": 1}, {"filter": "mlp", "value": 2}]
    assert evaluate_setting(value, NAME, 0.0) == 1


def test_filter_star_matches_all():
    value = [{"filter": "attn", "value": 1}, {"filter": "*", "value": 2}]
    assert evaluate_setting(value, "lm_head.weight", 0.0) == 2


def test_filter_list_without_match_is_none():
    value = [{"filter": "attn", "value": 1}]
    assert evaluate_setting(value, "lm_head.weight", 0.0) is None
    assert evaluate_setting([], "lm_head.weight", 0.0) is None


def test_nested_filter_and_gradient():
    value = [
        {"filter": "mlp", "value": [0.0, 1.0]},
        {"value": [{"filter": "q_proj", "value": 5}, {"value": 7}]},
    ]
    assert evaluate_setting(value, "model.layers.1.mlp.down_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(value, "model.layers.1.self_attn.q_proj.weight", 0.5) == 5
    assert evaluate_setting(value, "model.norm.weight", 0.5) == 7


# ------------------------------------------------------------------------------ Param.coerce


def _raises(param: Param, value, *fragments: str) -> str:
    with pytest.raises(MergeError) as info:
        param.coerce(value, "recipe.yaml: ties")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("recipe.yaml: ties")
    assert f"'{param.name}'" in msg
    for f in fragments:
        assert f in msg
    return msg


def test_float_param_accepts_ints_as_floats():
    out = Param("weight").coerce(2, "w")
    assert out == 2.0 and type(out) is float


@pytest.mark.parametrize("value", [True, "one", None, [1.0]])
def test_float_param_refuses_non_numbers(value):
    _raises(Param("weight"), value, "must be a number")


def test_float_param_reads_a_numeric_string():
    """YAML reads ``1e-3`` as a string; mergekit's parameter validation reads it as the number."""
    assert Param("weight").coerce("1e-3", "recipe.yaml: ties") == pytest.approx(0.001)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_float_param_refuses_non_finite(value):
    _raises(Param("weight"), value, "must be finite")


def test_int_param():
    p = Param("seed", default=0, kind=int)
    assert p.coerce(3, "w") == 3
    _raises(p, 3.0, "must be an integer")
    _raises(p, True, "must be an integer")


def test_bool_param():
    p = Param("normalize", default=False, kind=bool)
    assert p.coerce(True, "w") is True
    assert p.coerce(False, "w") is False
    _raises(p, 1, "must be true or false")
    _raises(p, "true", "must be true or false")


def test_str_param_with_choices():
    p = Param("granularity", default="model", kind=str, choices=("model", "tensor"))
    assert p.coerce("tensor", "w") == "tensor"
    _raises(p, 5, "must be a string")
    _raises(p, "layer", "must be one of model, tensor", "'layer'")


def test_check_and_hint():
    p = Param("density", default=1.0, check=lambda d: 0 < d <= 1, hint="density is the fraction kept, in (0, 1]")
    assert p.coerce(1, "w") == 1.0
    assert p.coerce(0.5, "w") == 0.5
    _raises(p, 0, "bad value 0.0", "density is the fraction kept, in (0, 1]")
    _raises(p, 1.5, "bad value 1.5")


def test_check_without_hint_has_no_trailing_colon():
    msg = _raises(Param("x", check=lambda v: v > 0), -1.0, "bad value -1.0")
    assert msg.endswith("'x'")
