"""Parameters a method does not read: a known name is a warning (mergekit ignores it silently and
users' recipes carry such leftovers), an unknown name is an error that suggests the nearest one."""

from __future__ import annotations

import pytest

from metamerge.errors import MergeError
from metamerge.methods.base import RecipeWarning
from metamerge.recipe import parse_recipe

from models import write_recipe


def _linear(fam, **params):
    return {"merge_method": "linear", "parameters": params,
            "models": [{"model": fam.refs[0], "parameters": {"weight": 0.5}},
                       {"model": fam.refs[1], "parameters": {"weight": 0.5}}]}


def test_known_but_unused_parameter_warns(tiny_llama_bf16):
    with pytest.warns(RecipeWarning, match=r"parameter 'density' in parameters is not used by linear"):
        recipe = parse_recipe(_linear(tiny_llama_bf16, density=0.5))
    assert recipe.parameters == {"density": 0.5}


def test_known_but_unused_per_model_parameter_warns(tiny_llama_bf16):
    data = _linear(tiny_llama_bf16)
    data["models"][1]["parameters"]["gamma"] = 0.01  # breadcrumbs' parameter
    with pytest.warns(RecipeWarning, match=rf"'gamma' in model '{tiny_llama_bf16.refs[1]}' parameters is not used"):
        parse_recipe(data)


def test_typo_is_an_error_with_the_nearest_name(tiny_llama_bf16):
    with pytest.raises(MergeError, match=r"unknown parameter 'wieght' .*did you mean 'weight'\?"):
        parse_recipe({**_linear(tiny_llama_bf16), "models": [
            {"model": tiny_llama_bf16.refs[0], "parameters": {"wieght": 0.5}},
            {"model": tiny_llama_bf16.refs[1], "parameters": {"weight": 0.5}}]})


def test_unknown_method_suggests_the_nearest(tiny_llama_bf16):
    with pytest.raises(MergeError, match=r"unknown merge_method 'task_arithmetc' \(did you mean 'task_arithmetic'\?"):
        parse_recipe({**_linear(tiny_llama_bf16), "merge_method": "task_arithmetc"})


def test_cli_prints_the_warning_and_merges(tiny_llama_bf16, tmp_path, capsys):
    from metamerge.cli import main

    path = write_recipe(tmp_path / "r.yaml", _linear(tiny_llama_bf16, density=0.5, int8_mask=True))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "'density'" in err and "'int8_mask'" in err and "not used by linear" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()
