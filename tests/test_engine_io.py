"""What a merge reads and writes: sharded safetensors in and out, files beside the weights,
tied embeddings, vocabulary policies, pickle opt-in, determinism, provenance."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from metamerge.recipe import load_recipe, parse_recipe

from models import build_tokenizer, derive, load_state, pickled, run_merge


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metagpt(fam, **params):
    return {"merge_method": "metagpt", "base_model": str(fam.base),
            "models": [{"model": r} for r in fam.refs], "parameters": params}


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def forward(model, vocab=64):
    ids = torch.tensor([[1, 5, 9, 17, 33, vocab - 1]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, vocab)
    assert torch.isfinite(logits).all()
    return logits


# ------------------------------------------------------------------------------ weights


def test_sharded_in_sharded_out_loads_with_transformers(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    assert (fam.base / "model.safetensors.index.json").exists()
    assert len(list(fam.base.glob("model-*.safetensors"))) > 1
    out = tmp_path / "out"
    run_merge(metagpt(fam), out, max_shard_size="10KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = load_state(out)
    assert sorted(index["weight_map"]) == sorted(load_state(fam.base)) == sorted(merged)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for shard in shards:  # every shard within the limit unless it holds a single bigger tensor
        with safe_open(str(shard), "pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == shard.name for k in keys)
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
            assert size <= 10_000 or len(keys) == 1
            assert f.metadata() == {"format": "pt"}
    model = load_hf(out)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), name
    forward(model)


def test_one_file_by_default(tiny_llama_fp32, tmp_path):
    out = tmp_path / "out"
    run_merge(metagpt(tiny_llama_fp32), out)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_gpt2_tied_embeddings_stay_tied(tiny_gpt2_tied, tmp_path):
    fam = tiny_gpt2_tied
    out = tmp_path / "out"
    run_merge(metagpt(fam), out, max_shard_size="8KB")
    merged = load_state(out)
    assert "lm_head.weight" not in merged  # stored once, as in the inputs
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = load_hf(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.wte.weight, merged["transformer.wte.weight"])
    forward(model)


def test_llama_stored_tied_head_is_written_tied(tiny_llama_tied_head, tmp_path):
    fam = tiny_llama_tied_head
    out = tmp_path / "out"
    run_merge(metagpt(fam), out, max_shard_size="6KB")
    merged = load_state(out)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    model = load_hf(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, merged["lm_head.weight"])
    forward(model)


def test_device_auto_runs_on_this_machine(tiny_llama_bf16, tmp_path):
    result = run_merge(metagpt(tiny_llama_bf16), tmp_path / "out", device="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert result.provenance["device"] == want
    forward(load_hf(tmp_path / "out"))


# ------------------------------------------------------------------------------ files beside the weights


def test_side_files(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    tok_dir = derive(fam.finetunes[1], tmp_path / "tok_src")
    tok = build_tokenizer()
    tok.add_tokens(["zz_marker"])  # a tokenizer distinguishable from the base's
    tok.save_pretrained(tok_dir)
    recipe = metagpt(fam)
    recipe["tokenizer_source"] = str(tok_dir)
    recipe["name"] = "tiny-merge"
    out = tmp_path / "out"
    result = run_merge(recipe, out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "merge_recipe.yaml", "merge_report.json",
            "provenance.json", "README.md", "model.safetensors"} <= names
    assert not any(n.startswith(".") for n in names)
    assert json.loads((out / "config.json").read_text()) == json.loads((fam.base / "config.json").read_text())
    assert sha256(out / "generation_config.json") == sha256(fam.base / "generation_config.json")
    tok_files = sorted(p.name for p in tok_dir.glob("tokenizer*"))
    assert tok_files and all(sha256(out / f) == sha256(tok_dir / f) for f in tok_files)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("zz_marker") == 64
    # the recipe written beside the model is the recipe that made it
    assert load_recipe(out / "merge_recipe.yaml") == parse_recipe(recipe)
    assert "tiny-merge" in (out / "README.md").read_text()
    assert result.out_dir == out


def test_no_generation_config_when_base_has_none(tiny_llama_bf16, tmp_path):
    assert not (tiny_llama_bf16.base / "generation_config.json").exists()
    run_merge(metagpt(tiny_llama_bf16), tmp_path / "out")
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()  # from the base by default


def test_report_contents(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    out = tmp_path / "out"
    run_merge(metagpt(fam), out)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "metagpt" and report["granularity"] == "model"
    assert report["base"] == str(fam.base) and report["models"] == fam.refs
    base = load_state(fam.base)
    assert sorted(report["tensors"]) == sorted(base)
    n = len(fam.refs)
    for entry in report["tensors"].values():
        assert len(entry["norms"]) == n and len(entry["coefficients"]) == n
        assert len(entry["cosine"]) == n and all(len(row) == n for row in entry["cosine"])
    assert len(report["model"]["cosine"]) == n
    for i in range(n):
        assert report["model"]["cosine"][i][i] == pytest.approx(1.0, abs=1e-6)
    # the fine-tunes' noise is independent: nearly orthogonal
    off = [abs(report["model"]["cosine"][i][j]) for i in range(n) for j in range(n) if i != j]
    assert max(off) < 0.1


def test_provenance_matches_files(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    out = tmp_path / "out"
    run_merge(metagpt(fam), out, max_shard_size="10KB")
    prov = json.loads((out / "provenance.json").read_text())
    # every output file but provenance.json itself, with its sha256
    on_disk = {p.name for p in out.iterdir() if p.name != "provenance.json"}
    assert set(prov["outputs"]) == on_disk
    for name, digest in prov["outputs"].items():
        assert sha256(out / name) == digest, name
    # inputs pinned by content: sha256 over the sorted (file name, file sha256) of each folder
    assert [i["role"] for i in prov["inputs"]] == ["base"] + ["model"] * len(fam.refs)
    for entry, path in zip(prov["inputs"], [fam.base, *fam.finetunes]):
        files = {p.name: sha256(p) for p in sorted(path.iterdir()) if p.is_file()}
        assert entry["files"] == files
        text = "".join(f"{n}\0{h}\n" for n, h in sorted(files.items()))
        assert entry["revision"] == hashlib.sha256(text.encode()).hexdigest()
        assert entry["ref"] == str(path) and entry["source"] == "local"
    assert prov["recipe_sha256"] == parse_recipe(metagpt(fam)).sha256()


def test_pinned_revision_must_match(tiny_llama_bf16, tmp_path):
    fam = tiny_llama_bf16
    prov_out = tmp_path / "first"
    run_merge(metagpt(fam), prov_out)
    rev = json.loads((prov_out / "provenance.json").read_text())["inputs"][1]["revision"]
    recipe = metagpt(fam)
    recipe["models"][0]["model"] = f"{fam.refs[0]}@{rev[:12]}"
    result = run_merge(recipe, tmp_path / "ok")
    assert result.provenance["inputs"][1]["revision"] == rev
    first = load_state(prov_out)
    for name, t in load_state(tmp_path / "ok").items():
        assert torch.equal(t, first[name])


# ------------------------------------------------------------------------------ determinism


def shard_hashes(out):
    return {p.name: sha256(p) for p in sorted(out.glob("*.safetensors*"))}


@pytest.mark.parametrize("recipe_kind", ["metagpt_dare", "dare_ties", "metagpt"])
def test_same_recipe_same_bytes(recipe_kind, tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    if recipe_kind == "dare_ties":
        recipe = {"merge_method": "dare_ties", "base_model": str(fam.base),
                  "models": [{"model": r, "parameters": {"weight": 0.5, "density": 0.5}} for r in fam.refs],
                  "parameters": {"seed": 5}}
    else:
        recipe = metagpt(fam, **({"sparsify": "dare", "density": 0.5, "seed": 5} if recipe_kind != "metagpt" else {}))
    runs = []
    for i in range(2):
        run_merge(recipe, tmp_path / f"run{i}", max_shard_size="10KB")
        runs.append(shard_hashes(tmp_path / f"run{i}"))
    assert len(runs[0]) > 2 and runs[0] == runs[1]
    reports = [json.loads((tmp_path / f"run{i}" / "merge_report.json").read_text()) for i in range(2)]
    assert reports[0] == reports[1]
    if recipe_kind != "metagpt":  # another seed draws other masks
        other = json.loads(json.dumps(recipe))
        other["parameters"]["seed"] = 6
        run_merge(other, tmp_path / "other", max_shard_size="10KB")
        changed = {k for k, v in shard_hashes(tmp_path / "other").items() if runs[0].get(k) != v}
        assert changed - {"model.safetensors.index.json"}


def test_cached_norms_are_used(tiny_llama_fp32, tmp_path):
    """Norms passed in by the pipeline (per fine-tune, per tensor) replace the norm pass."""
    from metamerge.engine import MergeOptions, merge

    fam = tiny_llama_fp32
    base = load_state(fam.base)
    sq = {}
    for k, (ref, path) in enumerate(zip(fam.refs, fam.finetunes)):
        state = load_state(path)
        sq[ref] = {n: float(((state[n].double() - base[n].double()) ** 2).sum()) * (4.0 if k == 0 else 1.0)
                   for n in base}
    result = merge(parse_recipe(metagpt(fam)), tmp_path / "out", MergeOptions(device="cpu", progress=False),
                   stats=sq)
    totals = [sum(sq[r][n] for n in sorted(base)) for r in fam.refs]
    for ref, total in zip(fam.refs, totals):
        assert result.report.model["lambdas"][ref] == pytest.approx(total / sum(totals), rel=1e-12)


# ------------------------------------------------------------------------------ vocabulary policies


@pytest.fixture(scope="module")
def bigger_vocab(tiny_llama_fp32, tmp_path_factory):
    """Fine-tune 1 of the fp32 Llama with 8 more vocabulary rows (and a 72-token tokenizer)."""
    path = tmp_path_factory.mktemp("vocab") / "ft_big"
    gen = torch.Generator().manual_seed(77)

    def grow(state):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            state[k] = torch.cat([state[k], 0.05 * torch.randn(8, state[k].shape[1], generator=gen)])

    derive(tiny_llama_fp32.finetunes[1], path, grow, config_edit=lambda c: c.update(vocab_size=72))
    build_tokenizer(72).save_pretrained(path)
    return path


def vocab_recipe(fam, big, **top):
    return {"merge_method": "metagpt", "base_model": str(fam.base),
            "models": [{"model": fam.refs[0]}, {"model": str(big)}], **top}


def expected_rows(fam, big, rows):
    """MetaGPT on the first ``rows`` vocabulary rows of every model (float64)."""
    base, ft0, ftb = load_state(fam.base), load_state(fam.finetunes[0]), load_state(big)

    def tau(s, n):
        t = s[n][:rows] if n in ("model.embed_tokens.weight", "lm_head.weight") else s[n]
        return t.double() - base[n].double()

    sq = [sum(float((tau(s, n) ** 2).sum()) for n in base) for s in (ft0, ftb)]
    lam = [x / sum(sq) for x in sq]
    ref = {n: base[n].double() + lam[0] * tau(ft0, n) + lam[1] * tau(ftb, n) for n in base}
    return ref, ftb, lam


def test_vocab_truncate(tiny_llama_fp32, bigger_vocab, tmp_path):
    fam = tiny_llama_fp32
    out = tmp_path / "out"
    result = run_merge(vocab_recipe(fam, bigger_vocab, vocab_policy="truncate"), out)
    merged = load_state(out)
    ref, _, lam = expected_rows(fam, bigger_vocab, 64)
    assert merged["lm_head.weight"].shape == (64, 16)
    for n, r in ref.items():
        assert (merged[n].double() - r).abs().max() <= 1e-6 * max(1.0, r.abs().max().item()), n
    assert [result.report.model["lambdas"][m] for m in (fam.refs[0], str(bigger_vocab))] == pytest.approx(lam, rel=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    forward(load_hf(out))


def test_vocab_extend(tiny_llama_fp32, bigger_vocab, tmp_path):
    fam = tiny_llama_fp32
    out = tmp_path / "out"
    run_merge(vocab_recipe(fam, bigger_vocab, vocab_policy="extend", tokenizer_source=str(bigger_vocab)), out)
    merged = load_state(out)
    ref, ftb, _ = expected_rows(fam, bigger_vocab, 64)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[n].shape == (72, 16)
        assert torch.equal(merged[n][64:], ftb[n][64:])  # the new rows, from the model that has them
        assert (merged[n][:64].double() - ref[n]).abs().max() <= 1e-6
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    assert sha256(out / "tokenizer.json") == sha256(bigger_vocab / "tokenizer.json")
    forward(load_hf(out), vocab=72)


# ------------------------------------------------------------------------------ pickle checkpoints


def test_pickle_checkpoint_with_allow_pickle(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    pk = pickled(fam.finetunes[1], tmp_path / "ft_pickle")
    recipe = metagpt(fam)
    same = metagpt(fam)
    recipe["models"][1]["model"] = str(pk)
    run_merge(recipe, tmp_path / "pickled", allow_pickle=True)
    run_merge(same, tmp_path / "safetensors")
    a, b = load_state(tmp_path / "pickled"), load_state(tmp_path / "safetensors")
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(tiny_llama_fp32, tmp_path, umask, dir_mode, file_mode):
    """A serving account (another user, the same group) reads the merge as the umask allows: the
    private temporary directory does not leak its 0700 into the output."""
    import os
    import stat

    old = os.umask(umask)
    try:
        run_merge(metagpt(tiny_llama_fp32), tmp_path / "out")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {file_mode}, modes
