"""``slices:`` recipes without mergekit: what the output holds (checked against the inputs' own
tensors), its config, report and provenance, and every refusal as one line. The same recipes
against the real mergekit are in tests/parity/test_parity_slices.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from metamerge.engine import MergeOptions, merge
from metamerge.errors import MergeError
from metamerge.recipe import parse_recipe
from metamerge.report import MergeReport

from models import assert_nothing_written, derive, layer_of, load_state, run_merge


def src(ref, start, end, **params):
    return {"model": str(ref), "layer_range": [start, end], **({"parameters": params} if params else {})}


def stack(fam, **top):
    """ft0 layers 0-1, ft1 layer 1, ft0 layer 1 again: 4 layers out of 2 (an overlapping repeat)."""
    a, b = fam.refs[:2]
    return {"merge_method": "linear", "parameters": {"weight": 1.0}, **top,
            "slices": [{"sources": [src(a, 0, 2)]}, {"sources": [src(b, 1, 2)]}, {"sources": [src(a, 1, 2)]}]}


def expect_error(recipe, out, *fragments) -> str:
    with pytest.raises(MergeError) as info:
        run_merge(recipe, out)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert_nothing_written(out)
    return msg


def renumber(name: str, layer: int) -> str:
    old = layer_of(name)
    return name.replace(f".{old}.", f".{layer}.", 1)


def test_stacked_layers_are_the_sources_layers(tiny_llama_bf16, tmp_path):
    fam = tiny_llama_bf16
    result = run_merge(stack(fam), tmp_path / "out")
    out = load_state(tmp_path / "out")
    a, b = load_state(fam.finetunes[0]), load_state(fam.finetunes[1])
    taken = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (a, 1)}  # output layer -> (model, source layer)
    for name, tensor in out.items():
        layer = layer_of(name)
        want = a[name] if layer is None else taken[layer][0][renumber(name, taken[layer][1])]
        assert torch.equal(tensor, want), name  # linear over one source at weight 1 is the source
    assert sorted({layer_of(n) for n in out} - {None}) == [0, 1, 2, 3]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    report = MergeReport.load(tmp_path / "out")
    assert report.models == fam.refs[:2]
    assert report.tensors["model.layers.2.mlp.up_proj.weight"]["models"] == [fam.refs[1]]
    assert report.coefficients == {fam.refs[0]: 1.0, fam.refs[1]: 1.0}
    assert len(result.plan.names) == len(out)


def test_embeddings_from_first_slice_final_norm_from_last(tiny_llama_bf16, tmp_path):
    fam = tiny_llama_bf16
    a, b = fam.refs[:2]
    run_merge({"merge_method": "linear", "parameters": {"weight": 1.0},
               "slices": [{"sources": [src(a, 0, 1)]}, {"sources": [src(b, 0, 1)]}]}, tmp_path / "out")
    out, sa, sb = load_state(tmp_path / "out"), load_state(fam.finetunes[0]), load_state(fam.finetunes[1])
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], sb["model.layers.0.self_attn.q_proj.weight"])


def test_tied_gpt2_stack_loads_and_runs(tiny_gpt2_tied, tmp_path):
    from transformers import AutoModelForCausalLM

    run_merge(stack(tiny_gpt2_tied, dtype="float32"), tmp_path / "out")
    assert "lm_head.weight" not in load_state(tmp_path / "out")  # tied: stored once, as in the inputs
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.n_layer == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tied_with_stored_head_takes_it_from_the_last_slice(tiny_llama_tied_head, tmp_path):
    """As mergekit: lm_head is one of the tensors after the layers, merged over the last slice even
    when the config ties it (the embedding comes from the first slice)."""
    fam = tiny_llama_tied_head
    a, b = fam.refs
    run_merge({"merge_method": "linear", "parameters": {"weight": 1.0},
               "slices": [{"sources": [src(a, 0, 1)]}, {"sources": [src(b, 0, 2)]}]}, tmp_path / "out")
    out, sa, sb = load_state(tmp_path / "out"), load_state(fam.finetunes[0]), load_state(fam.finetunes[1])
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])


def test_layer_types_follow_the_output_layers(tiny_llama_bf16, tmp_path):
    fam = tiny_llama_bf16
    typed = [derive(p, tmp_path / f"typed{i}", config_edit=lambda c: c.update(layer_types=["full_attention",
                                                                                           "sliding_attention"]))
             for i, p in enumerate(fam.finetunes)]
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [src(typed[0], 1, 2)]}, {"sources": [src(typed[1], 0, 2)]}]}
    result = merge(parse_recipe(recipe), tmp_path / "out", MergeOptions(device="cpu"), dry_run=True)
    assert result.plan.config_updates == {"num_hidden_layers": 3,
                                          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}


def test_config_donor_is_the_base(tiny_llama_bf16, tmp_path):
    """linear ignores a base that is not among a slice's sources, but the output's config comes from
    it (mergekit's donor); provenance lists it."""
    fam = tiny_llama_bf16
    run_merge(stack(fam, base_model=str(fam.base)), tmp_path / "out")
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert [(i["role"], i["ref"]) for i in prov["inputs"]] == [("model", fam.refs[0]), ("model", fam.refs[1]),
                                                               ("tokenizer", str(fam.base))]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["dtype"] == "bfloat16"
    recipe = stack(fam, base_model=str(fam.base), tokenizer_source=fam.refs[0])
    run_merge(recipe, tmp_path / "out2")
    prov = json.loads((tmp_path / "out2" / "provenance.json").read_text())
    assert prov["inputs"][-1]["role"] == "config" and prov["inputs"][-1]["ref"] == str(fam.base)


def test_residual_weight_warns_once(tiny_llama_bf16):
    fam = tiny_llama_bf16
    recipe = stack(fam)
    recipe["slices"][0]["residual_weight"] = 0.5
    recipe["parameters"]["gamma"] = 0.1  # known to another method: warned once, not once per slice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_recipe(recipe)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "residual_weight is read by nothing" in messages[1] and "slices[0]" in messages[1]
    assert "'gamma'" in messages[0] and "not used by linear" in messages[0]


def ta(fam, **slice_extra):
    return {"merge_method": "task_arithmetic", "base_model": str(fam.base), "parameters": {"weight": 0.5},
            "slices": [{"sources": [src(fam.base, 0, 2), src(fam.refs[0], 0, 2)], **slice_extra}]}


@pytest.mark.parametrize("edit,fragments", [
    (lambda r, f: r.update(models=[{"model": f.refs[0]}]), ["give either 'models'", "or 'slices'", "not both"]),
    (lambda r, f: r.pop("slices"), ["missing required key 'models' (or 'slices'"]),
    (lambda r, f: r["slices"][0].update(sources=[src(f.base, 1, 3), src(f.refs[0], 1, 3)]),
     ["slices[0]: layer_range [1, 3] is outside model", "which has 2 layers"]),
    (lambda r, f: r["slices"][0]["sources"][1].update(layer_range=[2, 1]),
     ["bad value for 'slices.0.sources.1.layer_range'", "[2, 1] is not a range of layers"]),
    (lambda r, f: r["slices"][0]["sources"][1].update(layer_range=[-1, 1]), ["[-1, 1] is not a range of layers"]),
    (lambda r, f: r["slices"][0]["sources"][1].update(layer_range=[0, 1]),
     ["sources cover different numbers of layers (2, 1)", "same number of layers"]),
    (lambda r, f: r["slices"][0].update(sources=[]), ["a slice needs at least one source"]),
    (lambda r, f: r["slices"][0]["sources"].append(src(f.refs[0], 0, 2)), ["slices[0]", "listed twice"]),
    (lambda r, f: r["slices"][0]["sources"].pop(0), ["slices[0]: base model", "is not one of this slice's sources"]),
    (lambda r, f: r["slices"][0].update(merge_method="ties"), ["unknown key 'slices.0.merge_method'",
                                                               "per-slice merge_method is not in mergekit 0.1.5"]),
    (lambda r, f: r.update(merge_method="metagpt", parameters={}), ["metagpt is not available with slices"]),
    (lambda r, f: r.update(vocab_policy="truncate"), ["vocab_policy: truncate is not supported with slices"]),
    (lambda r, f: r.update(parameters={}), ["slices[0]: task_arithmetic: model", "needs parameter 'weight'"]),
    (lambda r, f: r.update(merge_method="linear", slices=[{"sources": [src(f.refs[1], 0, 1)],
                                                           "parameters": {"weight": 0.0}}]),
     ["linear: the weights for tensor", "sum to 0"]),
    (lambda r, f: r["slices"].append({"sources": [src(f.refs[1], 0, 1), src(f.refs[0], 0, 1), src(f.base, 0, 1)]}),
     ["slices[1]: the tensors after the layers", "first 2 source(s)", "leave out its base"]),
], ids=["both", "neither", "out-of-range", "reversed", "negative", "different-lengths", "no-sources", "twice",
        "base-not-a-source", "per-slice-method", "metagpt", "vocab-policy", "no-weight", "slice-weight-zero",
        "post-without-base"])
def test_bad_slices(edit, fragments, tiny_llama_bf16, tmp_path):
    recipe = ta(tiny_llama_bf16)
    edit(recipe, tiny_llama_bf16)
    expect_error(recipe, tmp_path / "out", *fragments)


def test_a_slice_of_only_the_base_is_the_base(tiny_llama_bf16, tmp_path):
    """mergekit's task arithmetic returns the base when a slice has nothing else to add."""
    fam = tiny_llama_bf16
    recipe = ta(fam)
    recipe["slices"].append({"sources": [src(fam.refs[1], 1, 2)], "base_model": fam.refs[1]})
    run_merge(recipe, tmp_path / "out")
    out, ft1 = load_state(tmp_path / "out"), load_state(fam.finetunes[1])
    for name in ("model.layers.2.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], ft1[renumber(name, 1) if layer_of(name) is not None else name]), name


def test_sources_of_different_architectures(tiny_llama_bf16, tiny_gpt2_tied, tmp_path):
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [src(tiny_llama_bf16.refs[0], 0, 1)]},
                         {"sources": [src(tiny_gpt2_tied.refs[0], 0, 1)]}]}
    expect_error(recipe, tmp_path / "out", f"model '{tiny_gpt2_tied.refs[0]}'", "models must share one architecture")


def test_a_layer_missing_a_tensor(tiny_llama_bf16, tmp_path):
    fam = tiny_llama_bf16
    bad = derive(fam.finetunes[1], tmp_path / "bad", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [src(fam.refs[0], 0, 2)]}, {"sources": [src(bad, 1, 2)]}]}
    expect_error(recipe, tmp_path / "out", f"model '{bad}': layer 1", "mlp.up_proj.weight", "one architecture")
