"""metamerge.recipe: validation of mergekit-style YAML recipes, one-line errors, content hash."""

from __future__ import annotations

import pytest
import yaml

from metamerge.errors import MergeError
from metamerge.recipe import Recipe, load_recipe, parse_recipe


def metagpt(**extra) -> dict:
    data = {"merge_method": "metagpt", "base_model": "org/base",
            "models": [{"model": "org/ft-a"}, {"model": "org/ft-b"}]}
    data.update(extra)
    return data


def refused(data, *fragments: str, source: str = "r.yaml") -> str:
    with pytest.raises(MergeError) as info:
        parse_recipe(data, source)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(source)
    for f in fragments:
        assert f in msg, msg
    return msg


# ------------------------------------------------------------------------------ valid recipes


def test_minimal_metagpt_recipe():
    r = parse_recipe(metagpt())
    assert r.merge_method == "metagpt"
    assert r.base_model == "org/base"
    assert [m.model for m in r.models] == ["org/ft-a", "org/ft-b"]
    assert r.parameters == {}
    assert r.dtype is None and r.out_dtype is None
    assert r.vocab_policy == "error"


def test_task_arithmetic_recipe_with_per_model_and_gradient_parameters():
    r = parse_recipe({
        "merge_method": "ties", "base_model": "b", "dtype": "bfloat16",
        "parameters": {"normalize": True, "lambda": 0.8},
        "models": [
            {"model": "x", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
            {"model": "y", "parameters": {"weight": [{"filter": "mlp", "value": 1}, {"value": 0.3}]}},
        ],
    })
    assert r.dtype == "bfloat16"
    assert r.parameters == {"normalize": True, "lambda": 0.8}
    assert r.models[0].parameters == {"weight": 0.5, "density": [0.2, 0.8]}
    assert r.models[1].parameters["weight"][0] == {"filter": "mlp", "value": 1}


def test_model_reference_is_stripped():
    assert parse_recipe(metagpt(models=[{"model": "  org/ft-a "}])).models[0].model == "org/ft-a"


def test_fine_tunes_skip_a_parameterless_base():
    r = parse_recipe({"merge_method": "task_arithmetic", "base_model": "b",
                      "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 1}},
                                 {"model": "y", "parameters": {"weight": 2}}]})
    assert [m.model for m in r.models] == ["b", "x", "y"]
    assert [m.model for m in r.fine_tunes()] == ["x", "y"]


def test_fine_tunes_keep_a_base_with_parameters_and_parameterless_others():
    # Recipe.model_validate skips the method's own check (which refuses a base with parameters).
    r = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "b",
                               "models": [{"model": "b", "parameters": {"weight": 1}}, {"model": "x"}]})
    assert [m.model for m in r.fine_tunes()] == ["b", "x"]


def test_fine_tunes_without_base_model_are_all_models():
    r = Recipe.model_validate({"merge_method": "linear", "models": [{"model": "x"}, {"model": "y"}]})
    assert [m.model for m in r.fine_tunes()] == ["x", "y"]


# ------------------------------------------------------------------------------ refused recipes


@pytest.mark.parametrize("data", [None, [], "metagpt", 3])
def test_not_a_mapping(data):
    refused(data, "must be a YAML mapping")


@pytest.mark.parametrize("key, hint", [
    ("modules", "per-module"),
    ("tokenizer", "tokenizer_source"),
    ("chat_template", "chat_template"),
])
def test_unsupported_mergekit_keys_are_refused_with_their_hint(key, hint):
    refused(metagpt(**{key: []}), f"unknown key '{key}'", hint)


def test_typo_at_top_level_is_refused():
    refused(metagpt(paramters={"seed": 1}), "unknown key 'paramters'", "check its spelling")


def test_typo_inside_a_model_entry_names_its_path():
    refused(metagpt(models=[{"model": "x", "weight": 1}]), "unknown key 'models.0.weight'")


@pytest.mark.parametrize("key", ["merge_method", "models"])
def test_missing_required_key(key):
    data = metagpt()
    del data[key]
    refused(data, f"missing required key '{key}'")


def test_missing_model_key_in_an_entry():
    refused(metagpt(models=[{"parameters": {}}]), "missing required key 'models.0.model'")


def test_task_vector_method_needs_base_model():
    data = metagpt()
    del data["base_model"]
    refused(data, "needs base_model")


def test_unknown_merge_method():
    refused(metagpt(merge_method="slerpp"), "unknown merge_method 'slerpp'", "metagpt")


def test_unknown_parameter():
    refused(metagpt(parameters={"densty": 0.5}), "unknown parameter 'densty'", "density")


def test_bad_parameter_value():
    refused(metagpt(parameters={"granularity": "layer"}), "'granularity' must be one of model, tensor")


def test_lora_reference_is_accepted_as_written():
    """mergekit's BASE+ADAPTER is a valid reference (resolved to an adapter over BASE in refs.py)."""
    recipe = parse_recipe(metagpt(models=[{"model": "org/base+org/lora"}, {"model": "org/ft-b"}]))
    assert recipe.models[0].model == "org/base+org/lora"


def test_bad_dtype():
    refused(metagpt(dtype="int8"), "bad value for 'dtype'")


def test_no_fine_tunes():
    refused(metagpt(models=[{"model": "org/base"}]), "no models to merge")


def test_model_listed_twice():
    refused(metagpt(models=[{"model": "x"}, {"model": "x"}]), "model 'x' is listed twice")


# ------------------------------------------------------------------------------ sha256

BLOCK = """\
merge_method: metagpt
base_model: org/base
models:
  - model: org/ft-a
    parameters:
      density: 0.5
  - model: org/ft-b
parameters:
  sparsify: dare
  seed: 3
"""

# The same recipe: flow style, quoting, comments, other top-level key order.
FLOW = """\
# a comment
parameters: {sparsify: "dare", seed: 3}
models: [{model: 'org/ft-a', parameters: {density: 0.5}}, {model: org/ft-b}]
base_model:   "org/base"
merge_method: metagpt
"""


def _sha(text: str) -> str:
    return parse_recipe(yaml.safe_load(text)).sha256()


def test_sha256_ignores_yaml_formatting():
    assert _sha(BLOCK) == _sha(FLOW)
    assert len(_sha(BLOCK)) == 64 and int(_sha(BLOCK), 16) >= 0


def test_sha256_changes_with_content():
    assert _sha(BLOCK) != _sha(BLOCK.replace("seed: 3", "seed: 4"))
    assert _sha(BLOCK) != _sha(BLOCK.replace("density: 0.5", "density: 0.6"))


def test_sha256_ignores_key_order_inside_parameters():
    assert _sha(BLOCK) == _sha(BLOCK.replace("  sparsify: dare\n  seed: 3\n", "  seed: 3\n  sparsify: dare\n"))


def test_sha256_ignores_int_or_float_spelling_of_a_number():
    assert _sha(BLOCK.replace("density: 0.5", "density: 1")) == _sha(BLOCK.replace("density: 0.5", "density: 1.0"))


def test_to_yaml_round_trips():
    r = parse_recipe(yaml.safe_load(BLOCK))
    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert again.sha256() == r.sha256()


# ------------------------------------------------------------------------------ load_recipe


def test_load_recipe_reads_a_file(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(BLOCK, encoding="utf-8")
    r = load_recipe(path)
    assert r.parameters == {"sparsify": "dare", "seed": 3}
    assert r.sha256() == _sha(BLOCK)


def test_load_recipe_errors_name_the_file(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(BLOCK.replace("merge_method: metagpt", "merge_method: nope"), encoding="utf-8")
    with pytest.raises(MergeError, match=r"merge\.yaml: unknown merge_method 'nope'"):
        load_recipe(path)


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(MergeError, match="cannot read recipe .*absent.yaml"):
        load_recipe(tmp_path / "absent.yaml")


@pytest.mark.parametrize("text, line", [
    ("merge_method: metagpt\nbase_model: b\nmodels:\n  - model: x: y\n", 4),
    ("merge_method: metagpt\nmodels: [a, b\nbase_model: c\n", 3),
    ("merge_method: metagpt\n\tbase_model: b\n", 2),
])
def test_bad_yaml_is_one_line_with_the_line_number(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MergeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: line {line} is not valid YAML (")


def test_empty_file_is_not_a_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(MergeError, match="must be a YAML mapping"):
        load_recipe(path)


def test_non_utf8_file_is_a_merge_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BLOCK.encode() + b"name: caf\xe9\n")
    with pytest.raises(MergeError, match="latin1.yaml"):
        load_recipe(path)


@pytest.mark.parametrize("models, tokenizer_source, clash", [
    (["org/ft@1111111", "org/ft@2222222"], None, "'org/ft@1111111' and 'org/ft@2222222'"),
    (["org/ft@1111111", "org/ft"], None, "'org/ft@1111111' and 'org/ft'"),
    (["org/ft@1111111"], "org/ft@3333333", "'org/ft@1111111' and 'org/ft@3333333'"),
])
def test_one_model_at_two_revisions_is_refused(models, tokenizer_source, clash):
    refused(metagpt(models=[{"model": m} for m in models], tokenizer_source=tokenizer_source),
            f"model 'org/ft' appears at two revisions ({clash})")


def test_the_same_revision_twice_is_one_model():
    recipe = parse_recipe(metagpt(models=[{"model": "org/ft@1111111"}, {"model": "org/b@2222222"}],
                                  tokenizer_source="org/ft@1111111"))
    assert "org/ft@1111111" in recipe.referenced_models()
