"""Every bad input stops the merge with one line that names the problem (file, tensor, model) and
its fix, and leaves nothing behind: no output directory and no temporary sibling of it."""

from __future__ import annotations

import json

import pytest
import torch

from metamerge.errors import MergeError
from metamerge.executors import ExecutorConfig
from metamerge.io.direct import RangeWriter

from models import assert_nothing_written, derive, load_state, pickled, run_merge


def metagpt(fam, models=None, **params):
    return {"merge_method": "metagpt", "base_model": str(fam.base),
            "models": [{"model": str(m)} for m in (models or fam.refs)], "parameters": params}


def task_arithmetic(fam, models=None):
    return {"merge_method": "task_arithmetic", "base_model": str(fam.base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (models or fam.refs)]}


def expect_error(recipe, out, *fragments, **options) -> str:
    """Run the merge, expect a one-line MergeError containing every fragment, and no output."""
    with pytest.raises(MergeError) as info:
        run_merge(recipe, out, **options)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert_nothing_written(out)
    return msg


def damaged(fam, tmp_path, edit, *, index=-1, config_edit=None):
    """A copy of one fine-tune with ``edit`` applied to its tensors."""
    return derive(fam.finetunes[index], tmp_path / "damaged", edit, config_edit=config_edit)


Q = "model.layers.0.self_attn.q_proj.weight"


# ------------------------------------------------------------------------------ architecture


def test_missing_tensor(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(metagpt(tiny_llama_fp32, [tiny_llama_fp32.refs[0], bad]), tmp_path / "out",
                 f"model '{bad}'", "'model.layers.1.mlp.up_proj.weight'", "missing", "one architecture")


def test_extra_tensor(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, lambda s: s.update({"model.extra.weight": torch.zeros(4)}))
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", "'model.extra.weight'", "lacks", "one architecture")


def test_different_shape(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, lambda s: s.update({Q: s[Q][:, :8].clone()}))
    expect_error(task_arithmetic(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", f"'{Q}'", "[16, 8]", "[16, 16]", "one architecture")


def test_row_count_differs_outside_the_vocabulary(tiny_llama_fp32, tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight"
    bad = damaged(tiny_llama_fp32, tmp_path, lambda s: s.update({name: torch.cat([s[name], s[name][:2]])}))
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out", f"'{name}'", "[34, 16]",
                 "one architecture")
    recipe = metagpt(tiny_llama_fp32, [bad])
    recipe["vocab_policy"] = "truncate"  # a vocabulary policy does not excuse other tensors
    expect_error(recipe, tmp_path / "out", f"'{name}'", "one architecture")


def grow_vocab(rows):
    def edit(state):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            state[k] = torch.cat([state[k], torch.full((rows, state[k].shape[1]), 0.01)])
    return edit


def test_vocabulary_mismatch_is_an_error_by_default(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, grow_vocab(8), config_edit=lambda c: c.update(vocab_size=72))
    expect_error(metagpt(tiny_llama_fp32, [tiny_llama_fp32.refs[0], bad]), tmp_path / "out",
                 f"model '{bad}'", "vocabulary size differs", "72 rows vs 64", "vocab_policy: truncate or extend")


def test_extend_needs_the_tokenizer_of_the_bigger_model(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, grow_vocab(8), config_edit=lambda c: c.update(vocab_size=72))
    recipe = metagpt(tiny_llama_fp32, [tiny_llama_fp32.refs[0], bad])
    recipe["vocab_policy"] = "extend"
    expect_error(recipe, tmp_path / "out", f"'{bad}'", "set tokenizer_source to that model")


def test_nan_in_the_new_vocabulary_rows(tiny_llama_fp32, tmp_path):
    """With extend, the extra rows are copied, not merged: they are checked all the same."""
    def grow_with_nan(state):
        grow_vocab(8)(state)
        state["lm_head.weight"][-2, 3] = float("nan")
    bad = damaged(tiny_llama_fp32, tmp_path, grow_with_nan, config_edit=lambda c: c.update(vocab_size=72))
    recipe = metagpt(tiny_llama_fp32, [tiny_llama_fp32.refs[0], bad])
    recipe.update(vocab_policy="extend", tokenizer_source=str(bad))
    expect_error(recipe, tmp_path / "out", f"model '{bad}'", "'lm_head.weight'", "contains NaN")


def test_fine_tune_with_a_smaller_vocabulary(tiny_llama_fp32, tmp_path):
    def shrink(state):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            state[k] = state[k][:60].clone()
    bad = damaged(tiny_llama_fp32, tmp_path, shrink, config_edit=lambda c: c.update(vocab_size=60))
    recipe = metagpt(tiny_llama_fp32, [bad])
    recipe["vocab_policy"] = "truncate"
    expect_error(recipe, tmp_path / "out", f"model '{bad}'", "fewer rows (60)", "as the base")


def test_integer_tensor_refused(tiny_llama_fp32, tmp_path):
    def add_int(state):
        state["model.position_ids"] = torch.arange(8)
    base = derive(tiny_llama_fp32.base, tmp_path / "int_base", add_int)
    ft = derive(tiny_llama_fp32.finetunes[0], tmp_path / "int_ft", add_int)
    recipe = {"merge_method": "metagpt", "base_model": str(base), "models": [{"model": str(ft)}]}
    expect_error(recipe, tmp_path / "out", "'model.position_ids'", "torch.int64", "floating-point")


# ------------------------------------------------------------------------------ damaged weights


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
@pytest.mark.parametrize("method", ["metagpt", "task_arithmetic", "metagpt_tensor", "linear"])
def test_non_finite_weight(value, word, method, tiny_llama_fp32, tmp_path):
    def poison(state):
        state[Q][3, 5] = value
    bad = damaged(tiny_llama_fp32, tmp_path, poison)
    fam = tiny_llama_fp32
    models = [fam.refs[0], bad]
    if method == "metagpt":
        recipe = metagpt(fam, models)
    elif method == "metagpt_tensor":
        recipe = metagpt(fam, models, granularity="tensor")
    elif method == "task_arithmetic":
        recipe = task_arithmetic(fam, models)
    else:
        recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    expect_error(recipe, tmp_path / "out", f"model '{bad}'", f"'{Q}'", "model.safetensors", f"contains {word}",
                 "re-download")


def test_nan_in_the_base(tiny_llama_fp32, tmp_path):
    def poison(state):
        state["model.norm.weight"][0] = float("nan")
    base = derive(tiny_llama_fp32.base, tmp_path / "bad_base", poison)
    recipe = metagpt(tiny_llama_fp32)
    recipe["base_model"] = str(base)
    expect_error(recipe, tmp_path / "out", f"base '{base}'", "'model.norm.weight'", "contains NaN")


def test_truncated_file(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, None)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", "model.safetensors is truncated", "re-download or re-save")


def test_truncated_inside_the_header(tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, None)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", "model.safetensors is not a valid safetensors file", "re-download or re-save")


def header_file(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "little") + payload


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 20,                                                   # garbage
    b"\x01\x02",                                                              # shorter than a header
    header_file(b"{not json"),                                                # header is not JSON
    header_file(b"[1, 2, 3]"),                                                # JSON, not an object
    header_file(json.dumps({"w": {"dtype": "F32"}}).encode()),                # no shape / offsets
    header_file(json.dumps({"w": "F32"}).encode()),                           # entry not an object
    header_file(json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}}).encode()
                + bytes(16)),                                                 # offsets out of order
], ids=["garbage", "short", "not-json", "json-list", "no-shape", "entry-not-object", "offsets-reversed"])
def test_corrupt_file(content, tiny_llama_fp32, tmp_path):
    bad = damaged(tiny_llama_fp32, tmp_path, None)
    (bad / "model.safetensors").write_bytes(content)
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", "model.safetensors", "re-download or re-save")


def test_header_dtype_disagrees_with_the_data(tiny_llama_fp32, tmp_path):
    """A header that says F16 over F32 bytes would be read as garbage numbers: refuse it."""
    bad = damaged(tiny_llama_fp32, tmp_path, None)
    f = bad / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[Q]["dtype"] = "F16"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", f"tensor '{Q}' spans 1024 bytes", "re-download or re-save")


def test_shard_named_in_index_is_missing(tiny_llama_fp32, tmp_path):
    import shutil

    bad = tmp_path / "sharded"
    shutil.copytree(tiny_llama_fp32.finetunes[0], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(metagpt(tiny_llama_fp32, [bad]), tmp_path / "out",
                 f"model '{bad}'", f"shard {shard.name}", "model.safetensors.index.json", "re-download")


def test_pickle_refused_without_opt_in(tiny_llama_fp32, tmp_path):
    pk = pickled(tiny_llama_fp32.finetunes[-1], tmp_path / "damaged")
    expect_error(metagpt(tiny_llama_fp32, [pk]), tmp_path / "out",
                 f"model '{pk}'", "pytorch_model.bin", "pickle", "convert to safetensors", "--allow-pickle")


def test_corrupt_pickle_with_opt_in(tiny_llama_fp32, tmp_path):
    pk = damaged(tiny_llama_fp32, tmp_path, None)
    (pk / "model.safetensors").unlink()
    (pk / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    expect_error(metagpt(tiny_llama_fp32, [pk]), tmp_path / "out", f"model '{pk}'", "cannot load pytorch_model.bin",
                 allow_pickle=True)


def test_training_checkpoint_with_opt_in(tiny_llama_fp32, tmp_path):
    pk = pickled(tiny_llama_fp32.finetunes[-1], tmp_path / "damaged", "last.ckpt",
                 wrap=lambda state: {"state_dict": state, "epoch": 3})
    expect_error(metagpt(tiny_llama_fp32, [pk]), tmp_path / "out", f"model '{pk}'", "last.ckpt",
                 "not a flat state dict of tensors", "save_pretrained", allow_pickle=True)


def test_no_weights_at_all(tiny_llama_fp32, tmp_path):
    empty = damaged(tiny_llama_fp32, tmp_path, None)
    (empty / "model.safetensors").unlink()
    expect_error(metagpt(tiny_llama_fp32, [empty]), tmp_path / "out", f"model '{empty}'", "no *.safetensors weights")


# ------------------------------------------------------------------------------ the recipe


@pytest.mark.parametrize("edit,fragments", [
    (lambda r: r["models"].append({"model": r["base_model"], "parameters": {"density": 0.5}}),
     ["also listed as a fine-tune with parameters", "remove it from models"]),
    (lambda r: r.update(models=[]), ["no models to merge", "list at least one fine-tune"]),
    (lambda r: r.update(models=[{"model": r["base_model"]}]), ["no models to merge"]),
    (lambda r: r.update(slice_count=3), ["unknown key 'slice_count'", "check its spelling"]),
    (lambda r: r.update(slices=[{"sources": [{"model": r.pop("models")[0]["model"]}]}]),
     ["missing required key 'slices.0.sources.0.layer_range'"]),
    (lambda r: r["models"][0].update(weight=1.0), ["unknown key 'models.0.weight'"]),
    (lambda r: r.update(merge_method="metagpt2"), ["unknown merge_method 'metagpt2'", "available:", "metagpt"]),
    (lambda r: r["parameters"].update(desnity=0.5), ["unknown parameter 'desnity'", "known:", "density"]),
    (lambda r: r["models"][0].update(parameters={"sparsify": "dare"}),
     ["unknown per-model parameter 'sparsify'", "known: density"]),
    (lambda r: r["parameters"].update(density=1.5), ["bad value 1.5 for 'density'", "fraction kept, in (0, 1]"]),
    (lambda r: r["models"][0].update(parameters={"density": 0}), ["bad value 0.0 for 'density'"]),
    (lambda r: r["parameters"].update(granularity="layer"), ["'granularity' must be one of model, tensor"]),
    (lambda r: r["parameters"].update(seed=1.5), ["'seed' must be an integer"]),
    (lambda r: r["parameters"].update(density=[{"filter": "mlp", "val": 0.5}]), ["needs keys 'filter' and 'value'"]),
    (lambda r: r.update(dtype="float8"), ["bad value for 'dtype'"]),
    (lambda r: r.update(vocab_policy="pad"), ["bad value for 'vocab_policy'"]),
    (lambda r: r.pop("base_model"), ["needs base_model"]),
    (lambda r: r["models"].append(dict(r["models"][0])), ["listed twice"]),
    (lambda r: r["models"][0].update(model=r["base_model"] + "+" + r["models"][0]["model"]),
     ["has no adapter_config.json", "not a PEFT adapter"]),
    (lambda r: r.update(tokenizer_source="union"), ["tokenizer_source: union is not supported"]),
], ids=["base-with-params", "zero-models", "only-base", "unknown-key", "slices", "unknown-model-key",
        "unknown-method", "unknown-param", "global-param-per-model", "density-1.5", "density-0",
        "bad-choice", "bad-int", "bad-filter", "bad-dtype", "bad-vocab-policy", "no-base", "twice", "lora-not-adapter",
        "union"])
def test_bad_recipe(edit, fragments, tiny_llama_bf16, tmp_path):
    recipe = metagpt(tiny_llama_bf16)
    edit(recipe)
    expect_error(recipe, tmp_path / "out", *fragments)


def test_task_arithmetic_needs_weights(tiny_llama_bf16, tmp_path):
    recipe = task_arithmetic(tiny_llama_bf16)
    del recipe["models"][1]["parameters"]["weight"]
    expect_error(recipe, tmp_path / "out", f"model '{tiny_llama_bf16.refs[1]}' needs parameter 'weight'")


def test_linear_weights_that_sum_to_zero(tiny_llama_bf16, tmp_path):
    """normalize: true with weights summing to 0 would divide by zero (NaN); say so, per tensor."""
    fam = tiny_llama_bf16
    recipe = {"merge_method": "linear", "models": [
        {"model": fam.refs[0], "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]}},
        {"model": fam.refs[1], "parameters": {"weight": [{"filter": "mlp", "value": -1.0}, {"value": 0.5}]}}]}
    expect_error(recipe, tmp_path / "out", "model.layers.0.mlp.down_proj.weight", "sum to 0", "normalize: false")


def test_missing_model_directory(tiny_llama_bf16, tmp_path):
    missing = tmp_path / "no_such_model"
    expect_error(metagpt(tiny_llama_bf16, [tiny_llama_bf16.refs[0], missing]), tmp_path / "out",
                 f"model '{missing}'", "no such directory", "check the path in the recipe")


def test_pinned_local_revision_mismatch(tiny_llama_bf16, tmp_path):
    ref = f"{tiny_llama_bf16.refs[0]}@0123456789ab"
    expect_error(metagpt(tiny_llama_bf16, [ref]), tmp_path / "out",
                 f"model '{ref}'", "not '0123456789ab'", "changed since the recipe was pinned")


# ------------------------------------------------------------------------------ options


def test_bad_max_shard_size(tiny_llama_bf16, tmp_path):
    expect_error(metagpt(tiny_llama_bf16), tmp_path / "out", "bad size '12 parsecs'", "2GB",
                 max_shard_size="12 parsecs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_device_cuda_without_gpu(tiny_llama_bf16, tmp_path):
    expect_error(metagpt(tiny_llama_bf16), tmp_path / "out", "--device cuda", "no CUDA GPU", "--device cpu or auto",
                 device="cuda")


# ------------------------------------------------------------------------------ the output directory


def test_existing_output_is_left_alone(tiny_llama_bf16, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError) as info:
        run_merge(metagpt(tiny_llama_bf16), out)
    assert str(info.value) == f"{out} already exists; choose another output directory or pass --overwrite"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_the_output(tiny_llama_bf16, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    run_merge(metagpt(tiny_llama_bf16), out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").exists() and (out / "provenance.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_merge_leaves_nothing(overwrite, tiny_llama_fp32, tmp_path, monkeypatch):
    """NaN in the last tensor of the last model: shards were already being written when it is
    found; none of it appears, and an existing output (with --overwrite) survives untouched."""
    fam = tiny_llama_fp32
    last = sorted(load_state(fam.base))[-1]

    def poison(state):
        state[last].view(-1)[-1] = float("nan")
    bad = damaged(fam, tmp_path, poison)
    writes = []
    real_write = RangeWriter.write

    def spy(self, data):
        writes.append(self.path)
        return real_write(self, data)

    monkeypatch.setattr(RangeWriter, "write", spy)
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("previous merge")
    recipe = task_arithmetic(fam, [*fam.refs[:2], bad])
    with pytest.raises(MergeError) as info:  # in this process (one worker): the spy sees every write
        run_merge(recipe, out, max_shard_size="10KB", overwrite=overwrite, executor=ExecutorConfig(n_workers=1))
    assert f"model '{bad}'" in str(info.value) and f"'{last}'" in str(info.value)
    assert len(writes) == len(load_state(fam.base)) - 1  # every other tensor had been written
    assert writes[0].parent.name.startswith(".out.stage-") and not writes[0].parent.exists()
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "out"]
    else:
        assert_nothing_written(out)
