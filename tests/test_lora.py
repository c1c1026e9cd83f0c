"""LoRA adapters as fine-tunes (issue 15): real PEFT adapters of a tiny real model, merged by the
engine, against an independent float64 computation from each adapter's full-weight equivalent
(PEFT's own ``merge_and_unload``, in float64).

The adapters differ in rank, alpha, rsLoRA, rank/alpha patterns and target modules, have non-zero
``B``, and one has ``modules_to_save``; a GPT-2 adapter has ``fan_in_fan_out``.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from metamerge.adapter_out import merge_to_adapter
from metamerge.engine import MergeOptions
from metamerge.errors import MergeError
from metamerge.io.adapter import AdapterReader
from metamerge.recipe import parse_recipe

from lora_models import ADAPTERS, LoraSpec, build_adapter, build_base, build_full_finetune, full_weights
from models import assert_nothing_written, hub_snapshot, load_state, run_merge

REL = 1e-6  # lambdas: the stat pass takes a modules_to_save tensor's norm from float32 weights


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A base, three adapters, a full fine-tune, and every input's float64 full weights."""
    root = tmp_path_factory.mktemp("lora")
    base = build_base(root)
    adapters = {s.name: build_adapter(base, root / s.name, s) for s in ADAPTERS}
    full = build_full_finetune(root, base)
    weights = {name: full_weights(base, path) for name, path in adapters.items()}
    weights["full"] = {k: v.double() for k, v in load_state(full).items()}
    return {"root": root, "base": base, "adapters": adapters, "full": full, "weights": weights,
            "base_weights": {k: v.double() for k, v in load_state(base).items()}}


def expected(lo, names: list[str], coeffs: list[float]) -> dict[str, torch.Tensor]:
    b = lo["base_weights"]
    return {k: b[k] + sum(c * (lo["weights"][n][k] - b[k]) for n, c in zip(names, coeffs)) for k in b}


def metagpt_lambdas(lo, names: list[str]) -> list[float]:
    b = lo["base_weights"]
    sq = [sum(float(((lo["weights"][n][k] - b[k]) ** 2).sum()) for k in b) for n in names]
    return [s / sum(sq) for s in sq]


def assert_close(out_dir, want: dict[str, torch.Tensor], atol=1e-6):
    got = load_state(out_dir)
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=atol, msg=k)


def recipe(lo, method: str, refs: list[str], each: dict | None = None, **top) -> dict:
    """A recipe over ``refs`` with the test base; ``each``: every model's parameters."""
    return {"merge_method": method, "base_model": str(lo["base"]), **top,
            "models": [{"model": r, **({"parameters": dict(each)} if each else {})} for r in refs]}


def test_norm_from_factors_equals_the_norm_of_the_materialised_update(lora):
    lo = lora
    for name, path in lo["adapters"].items():
        reader = AdapterReader(lo["base"], path, name)
        assert reader.spec.factors
        for t, f in reader.spec.factors.items():
            want = float(((lo["weights"][name][t] - lo["base_weights"][t]) ** 2).sum())
            got = reader.factor_sqnorm(t)
            assert got == pytest.approx(want, rel=1e-9), (name, t)
            assert got == pytest.approx(float((reader.delta(t) ** 2).sum()), rel=1e-12)
            assert f.scale == (f.alpha / f.rank ** 0.5 if name == "rslora" else f.alpha / f.rank)


def test_scaling_rules_read_from_the_config(lora):
    spec = AdapterReader(lora["base"], lora["adapters"]["rslora"], "rslora").spec
    f = spec.factors
    assert f["model.layers.0.mlp.down_proj.weight"].rank == 3  # rank_pattern
    assert f["model.layers.1.self_attn.q_proj.weight"].alpha == 5  # alpha_pattern
    assert f["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(16 / 2 ** 0.5)  # rsLoRA
    saved = AdapterReader(lora["base"], lora["adapters"]["saved"], "saved").spec
    assert set(saved.full) == {"lm_head.weight"}  # modules_to_save: a full tensor


def test_metagpt_over_adapter_folders_and_base_plus_adapter(lora, tmp_path):
    """The same merge from folders and from BASE+ADAPTER references: equal to float64 MetaGPT."""
    names = list(lora["adapters"])
    lams = metagpt_lambdas(lora, names)
    want = expected(lora, names, lams)
    folders = run_merge(recipe(lora, "metagpt", [str(p) for p in lora["adapters"].values()]), tmp_path / "a")
    plus = run_merge(recipe(lora, "metagpt", [f"{lora['base']}+{p}" for p in lora["adapters"].values()]),
                     tmp_path / "b")
    for result in (folders, plus):
        assert list(result.report.coefficients.values()) == pytest.approx(lams, rel=REL)
    assert_close(tmp_path / "a", want)
    assert load_state(tmp_path / "a").keys() == load_state(tmp_path / "b").keys()
    for k, v in load_state(tmp_path / "a").items():
        assert torch.equal(v, load_state(tmp_path / "b")[k]), k
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    adapters = [i for i in prov["inputs"] if i.get("adapter")]
    assert len(adapters) == 3 and all(i["base_path"] == str(lora["base"]) for i in adapters)
    base_rev = next(i["revision"] for i in prov["inputs"] if i["role"] == "base")
    assert all(i["base_revision"] == base_rev and len(base_rev) == 64 for i in adapters)  # BASE of BASE+ADAPTER pinned


def test_metagpt_lambdas_exact_from_factors_alone(lora, tmp_path):
    """Adapters without modules_to_save: every norm comes from the factors, exact in float64."""
    names = ["plain", "rslora"]
    result = run_merge(recipe(lora, "metagpt", [str(lora["adapters"][n]) for n in names]), tmp_path / "o")
    assert list(result.report.coefficients.values()) == pytest.approx(metagpt_lambdas(lora, names), rel=1e-12)


def test_adapters_mixed_with_a_full_finetune(lora, tmp_path):
    names = ["plain", "saved", "full"]
    refs = [str(lora["adapters"]["plain"]), str(lora["adapters"]["saved"]), str(lora["full"])]
    run_merge(recipe(lora, "task_arithmetic", refs, each={"weight": 0.6}), tmp_path / "ta")
    assert_close(tmp_path / "ta", expected(lora, names, [0.6] * 3))
    result = run_merge(recipe(lora, "metagpt", refs), tmp_path / "mg")
    lams = metagpt_lambdas(lora, names)
    assert list(result.report.coefficients.values()) == pytest.approx(lams, rel=REL)
    assert_close(tmp_path / "mg", expected(lora, names, lams))


def test_fan_in_fan_out_gpt2_adapter(tmp_path):
    base = build_base(tmp_path, "gpt2")
    specs = [LoraSpec("g1", {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True}, 31),
             LoraSpec("g2", {"r": 3, "lora_alpha": 3, "target_modules": ["c_attn", "c_fc"],
                             "fan_in_fan_out": True}, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = [build_adapter(base, tmp_path / s.name, s) for s in specs]
        fulls = [full_weights(base, p) for p in paths]
    b = {k: v.double() for k, v in load_state(base).items()}
    taus = [{k: f[k] - b[k] for k in b} for f in fulls]
    sq = [sum(float((t[k] ** 2).sum()) for k in b) for t in taus]
    lams = [s / sum(sq) for s in sq]
    result = run_merge({"merge_method": "metagpt", "base_model": str(base),
                        "models": [{"model": str(p)} for p in paths]}, tmp_path / "out")
    assert list(result.report.coefficients.values()) == pytest.approx(lams, rel=1e-12)
    got = load_state(tmp_path / "out")
    for k in b:  # GPT-2 ties lm_head to wte; the merged folder stores the tensors the base stores
        torch.testing.assert_close(got[k].double(), b[k] + sum(lam * t[k] for lam, t in zip(lams, taus)),
                                   rtol=0, atol=1e-6)


def edited_copy(adapter, dst, **config):
    """A copy of ``adapter`` whose adapter_config.json has ``config``'s keys changed."""
    shutil.copytree(adapter, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_dora_is_refused_and_nothing_written(lora, tmp_path):
    spec = LoraSpec("dora", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": True}, 41)
    path = build_adapter(lora["base"], tmp_path / "dora", spec)
    with pytest.raises(MergeError, match=r"DoRA \(use_dora: true\) is not supported") as info:
        run_merge(recipe(lora, "metagpt", [str(path), str(lora["adapters"]["plain"])]), tmp_path / "out")
    assert "\n" not in str(info.value) and "merge_and_unload" in str(info.value)
    assert_nothing_written(tmp_path / "out")


def test_other_peft_types_are_refused_by_name(lora, tmp_path):
    loha = edited_copy(lora["adapters"]["plain"], tmp_path / "loha", peft_type="LOHA")
    with pytest.raises(MergeError, match="LOHA adapters are not supported"):
        run_merge(recipe(lora, "metagpt", [str(loha)]), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_base_mismatch_warns_on_a_name_and_fails_on_shapes(lora, tmp_path):
    named = edited_copy(lora["adapters"]["plain"], tmp_path / "named", base_model_name_or_path="someone/other-model")
    with pytest.warns(UserWarning, match="trained on 'someone/other-model'"):
        run_merge(recipe(lora, "metagpt", [str(named)]), tmp_path / "ok")
    wrong = tmp_path / "wrong"
    shutil.copytree(lora["adapters"]["plain"], wrong)
    state = load_file(wrong / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    state[key] = torch.zeros(4, 24)  # in-features 24: another base's width
    save_file(state, wrong / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="the adapter was trained on another base model"):
        run_merge(recipe(lora, "metagpt", [str(wrong)]), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_bare_adapter_needs_a_base(lora, tmp_path):
    with pytest.raises(MergeError, match="is a LoRA adapter and the recipe has no base_model"):
        run_merge({"merge_method": "linear", "models": [{"model": str(lora["adapters"]["plain"]),
                                                         "parameters": {"weight": 1.0}}]}, tmp_path / "out")


# ------------------------------------------------------------------------- --as-adapter


def as_adapter(rec: dict, out):
    return merge_to_adapter(parse_recipe(rec), out, MergeOptions(device="cpu", progress=False))


def peft_full(base, adapter, dtype=torch.float64):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)


@pytest.mark.parametrize("method,extra", [
    ("metagpt", {}),
    ("task_arithmetic", {"each": {"weight": 0.7}, "parameters": {"lambda": 0.5}}),
    ("linear", {"each": {"weight": 1.0}}),
])
def test_as_adapter_loaded_with_peft_equals_the_full_merge(lora, tmp_path, method, extra):
    from transformers import AutoModelForCausalLM

    names = ["plain", "rslora"]
    refs = [str(lora["adapters"][n]) for n in names]
    if method == "linear":  # linear averages whole models: the adapters as BASE+ADAPTER, no base_model input
        rec = {"merge_method": "linear", "models": [{"model": f"{lora['base']}+{r}", "parameters": {"weight": w}}
                                                    for r, w in zip(refs, (1.0, 3.0))]}
        coeffs = [0.25, 0.75]
    else:
        rec = recipe(lora, method, refs, **extra)
        coeffs = metagpt_lambdas(lora, names) if method == "metagpt" else [0.35, 0.35]
    result = as_adapter(rec, tmp_path / "adapter")
    run_merge(rec, tmp_path / "full")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and result.rank == cfg["r"] == 4 + 2  # q_proj: plain 4 + rslora 2
    # the weights: PEFT's merge of the written adapter onto the base, in float64, vs float64 expectation;
    # exact but for the float32 rounding of the stored factors (updates here are up to ~0.4)
    merged = peft_full(lora["base"], tmp_path / "adapter").merge_and_unload().state_dict()
    want = expected(lora, names, coeffs)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-7, msg=k)
    # the outputs: the adapter on the base (float32) against the full merged model
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = peft_full(lora["base"], tmp_path / "adapter", torch.float32)(x).logits
        f = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)(x).logits
    torch.testing.assert_close(a, f, rtol=0, atol=1e-5)
    assert not torch.allclose(a, AutoModelForCausalLM.from_pretrained(lora["base"])(x).logits, atol=1e-3)


@pytest.mark.parametrize("case,fragment", [
    ("ties", "ties is not a weighted sum of the task vectors"),
    ("full", "is a full model"),
    ("saved", "modules_to_save"),
    ("sparsify", "metagpt with sparsify"),
])
def test_as_adapter_refuses_what_is_not_low_rank(lora, tmp_path, case, fragment):
    plain = str(lora["adapters"]["plain"])
    rec = {"ties": recipe(lora, "ties", [plain], each={"weight": 1.0, "density": 0.5}),
           "full": recipe(lora, "metagpt", [plain, str(lora["full"])]),
           "saved": recipe(lora, "metagpt", [plain, str(lora["adapters"]["saved"])]),
           "sparsify": recipe(lora, "metagpt", [plain], parameters={"sparsify": "dare"},
                              each={"density": 0.5})}[case]
    with pytest.raises(MergeError, match=fragment) as info:
        as_adapter(rec, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert_nothing_written(tmp_path / "out")


def test_cli_as_adapter(lora, tmp_path, capsys):
    import yaml

    from metamerge.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(lora, "metagpt", [str(p) for p in list(lora["adapters"].values())[:2]])))
    assert main(["merge", str(path), str(tmp_path / "out"), "--as-adapter", "--no-progress", "--device", "cpu"]) == 0
    assert "LoRA adapter: " in capsys.readouterr().out
    assert main(["merge", str(path), str(tmp_path / "k"), "--as-adapter", "--rank", "2", "--no-progress"]) == 0
    assert "APPROXIMATE: rank truncated, relative error" in capsys.readouterr().out
    assert main(["merge", str(path), str(tmp_path / "full"), "--rank", "2"]) == 2
    assert "error: --rank applies to --as-adapter only" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "full")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json", "merge_recipe.yaml",
            "provenance.json", "README.md", "tokenizer.json"} <= files and not any(f.startswith("model") for f in files)


def test_the_watcher_picks_up_adapter_folders(lora, tmp_path):
    from pipeline.params import load_params
    from pipeline.watch import watched_additions

    watched = tmp_path / "watched"
    shutil.copytree(lora["adapters"]["plain"], watched / "new-lora")
    shutil.copytree(lora["full"], watched / "new-full")
    (watched / "notes").mkdir()  # neither a model nor an adapter
    params = load_params({"recipe": recipe(lora, "metagpt", [str(lora["adapters"]["rslora"])]),
                          "pipeline": {"output_root": str(tmp_path / "out"), "device": "cpu",
                                       "watch": [{"dir": str(watched)}]}}, check_files=False)
    assert [a["model"] for a in watched_additions(params)] == [str(watched / "new-full"), str(watched / "new-lora")]


def test_evaluation_loads_an_adapter_output_onto_its_base(lora, tmp_path):
    """The --as-adapter output, scored by the evaluation package (loaded onto the base named in its
    config), scores as the full merged model does."""
    from evaluation import evaluate_model

    rec = recipe(lora, "metagpt", [str(lora["adapters"]["plain"]), str(lora["adapters"]["rslora"])])
    as_adapter(rec, tmp_path / "adapter")
    run_merge(rec, tmp_path / "full")
    gen = torch.Generator().manual_seed(1)
    lines = [json.dumps({"prompt": " ".join(f"w{int(i)}" for i in torch.randint(4, 60, (6,), generator=gen)),
                         "completion": f" w{int(torch.randint(4, 60, (1,), generator=gen))}"}) for _ in range(12)]
    (tmp_path / "task.jsonl").write_text("\n".join(lines) + "\n")
    sets = {"task": tmp_path / "task.jsonl"}
    a = evaluate_model(tmp_path / "adapter", sets, device="cpu", progress=False)["task"]
    f = evaluate_model(tmp_path / "full", sets, device="cpu", progress=False)["task"]
    base = evaluate_model(lora["base"], sets, device="cpu", progress=False)["task"]
    assert a.loss == pytest.approx(f.loss, rel=1e-6) and a.exact_match == f.exact_match
    assert abs(a.loss - base.loss) > 1e-3  # the adapter was applied


def test_the_registry_registers_an_adapter_output_with_its_lineage(lora, tmp_path):
    from modelregistry.config import RegistryConfig
    from modelregistry.register import register_merge

    plain, rslora = str(lora["adapters"]["plain"]), f"{lora['base']}+{lora['adapters']['rslora']}"
    as_adapter(recipe(lora, "metagpt", [plain, rslora]), tmp_path / "adapter")
    config = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", experiment_name="lora",
                            model_name="lora-merge")
    res = register_merge(tmp_path / "adapter", {}, {}, {"git_commit": "0" * 40}, config, gate=False)
    version = config.client().get_model_version("lora-merge", res.version)
    tags = version.tags
    assert tags["output"] == "lora_adapter"
    roles = {tags[f"input.{i}.ref"]: i for i in range(3)}
    assert tags[f"input.{roles[plain]}.adapter_base"] == str(lora["base"])  # a bare folder: the recipe's base
    assert tags[f"input.{roles[rslora]}.adapter_base"] == str(lora["base"])
    assert tags[f"input.{roles[str(lora['base'])]}.role"] == "base"
    assert all(len(tags[f"input.{i}.revision"]) == 64 for i in range(3))  # content hashes, pinned


def test_same_bytes_on_one_and_two_threads(tmp_path):
    """Adapter tensors past ATen's parallel grain (256 x 256): the merge and the --as-adapter
    output are the same bytes with 1 and 2 threads (factor norms are fixed-order sums)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import build_tokenizer, save

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    base = save(LlamaForCausalLM(cfg).eval(), tmp_path / "base", dtype=torch.float32, tokenizer=build_tokenizer())
    refs = [str(build_adapter(base, tmp_path / f"a{i}", LoraSpec(f"a{i}", {"r": 8 + i, "lora_alpha": 16,
                                                                           "target_modules": ["q_proj", "down_proj"]},
                                                                 50 + i))) for i in range(2)]
    rec = {"merge_method": "metagpt", "base_model": str(base), "models": [{"model": r} for r in refs]}
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            run_merge(rec, tmp_path / f"full{n}")
            as_adapter(rec, tmp_path / f"adapter{n}")
            outs.append([(tmp_path / f"{kind}{n}" / f).read_bytes() for kind, f in
                         (("full", "model.safetensors"), ("adapter", "adapter_model.safetensors"))])
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]


def test_rank_k_is_the_best_rank_k_approximation_and_reports_its_error(lora, tmp_path):
    """--rank 3 (the exact merge has rank 6 on q_proj): each module's update is its truncated SVD,
    compared with an SVD of the float64 expected update computed here; the reported error too."""
    names = ["plain", "rslora"]
    rec = recipe(lora, "metagpt", [str(lora["adapters"][n]) for n in names])
    result = merge_to_adapter(parse_recipe(rec), tmp_path / "a", MergeOptions(device="cpu", progress=False), rank=3)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 3
    want = expected(lora, names, metagpt_lambdas(lora, names))
    merged = peft_full(lora["base"], tmp_path / "a").merge_and_unload().state_dict()
    lost = total = 0.0
    truncated = {}
    for k, v in want.items():
        d = v - lora["base_weights"][k]
        if not d.abs().max() > 0:
            continue
        u, sv, vh = torch.linalg.svd(d)
        if int((sv > 1e-12 * sv[0]).sum()) > 3:  # modules whose exact update has rank > 3
            best = (u[:, :3] * sv[:3]) @ vh[:3]
            lost, total = lost + float((sv[3:] ** 2).sum()), total + float((sv ** 2).sum())
            truncated[k] = float((sv[3:] ** 2).sum() / (sv ** 2).sum()) ** 0.5
        else:
            best = d
        torch.testing.assert_close(merged[k] - lora["base_weights"][k], best, rtol=0, atol=1e-6, msg=k)
    assert truncated and result.truncation_error == pytest.approx((lost / total) ** 0.5, rel=1e-9)
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())["model"]
    assert report["exact"] is False and report["truncation"]["rank"] == 3
    assert {f"{m}.weight": e for m, e in report["truncation"]["modules"].items()} == pytest.approx(truncated, rel=1e-9)
    assert 0 < result.truncation_error < 1


@pytest.mark.parametrize("part,fragment", [("lora_A.weight", "adapter tensor"), ("lm_head.weight", "lm_head.weight")])
def test_a_damaged_adapter_is_named(lora, tmp_path, part, fragment):
    bad = tmp_path / "bad"
    shutil.copytree(lora["adapters"]["saved"], bad)
    state = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sorted(state) if k.endswith(part))
    state[key][0, 0] = float("nan")
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(MergeError) as info:
        run_merge(recipe(lora, "metagpt", [str(bad)]), tmp_path / "out")
    msg = str(info.value)
    assert "NaN" in msg and fragment in msg and ("adapter_model.safetensors" in msg or key in msg), msg
    assert_nothing_written(tmp_path / "out")


def test_an_adapter_as_base_model_is_refused(lora, tmp_path):
    rec = {"merge_method": "metagpt", "base_model": str(lora["adapters"]["plain"]), "models": [{"model": str(lora["full"])}]}
    with pytest.raises(MergeError, match="is itself an adapter; write it as BASE\\+ADAPTER"):
        run_merge(rec, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_a_pinned_adapter_is_picklable_and_opens_in_a_worker(lora):
    """What a scaled-out worker gets: the pinned model (pickled), opened with open_reader."""
    import pickle

    from metamerge.loading import open_reader
    from metamerge.refs import resolve

    pinned = resolve(f"{lora['base']}+{lora['adapters']['rslora']}")
    copy = pickle.loads(pickle.dumps(pinned))
    reader = open_reader(copy, "worker")
    assert isinstance(reader, AdapterReader) and set(reader.tensors) == set(lora["base_weights"])
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(reader.get(name).double(), lora["weights"]["rslora"][name], rtol=0, atol=1e-7)
    assert torch.equal(reader.get("model.norm.weight"), load_state(lora["base"])["model.norm.weight"])


def test_hub_adapters_at_a_revision_merge_like_their_folders(lora, tmp_path, monkeypatch):
    """``org/name@commit`` adapters from the hub cache (offline; the layout the hub writes: blobs,
    snapshot links, refs/main), as a bare reference and as ``BASE+org/name@commit``: pinned to that
    commit (not refs/main, which moved on) and merged to the same bytes as their folders."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: the cache is the hub
    names = list(lora["adapters"])[:2]
    refs = []
    for i, name in enumerate(names):
        hub_snapshot(cache, f"org/lora-{name}", f"{i}" * 40, lora["adapters"][name])
        hub_snapshot(cache, f"org/lora-{name}", f"{i + 5}" * 40, lora["adapters"][names[1 - i]])  # main moves on
        refs.append(f"org/lora-{name}@{f'{i}' * 40}")
    folders = run_merge(recipe(lora, "metagpt", [str(lora["adapters"][n]) for n in names]), tmp_path / "folders")
    hub = run_merge(recipe(lora, "metagpt", refs), tmp_path / "hub-bare")
    plus = run_merge(recipe(lora, "metagpt", [f"{lora['base']}+{r}" for r in refs]), tmp_path / "hub-plus")
    want = load_state(tmp_path / "folders")
    for out in (tmp_path / "hub-bare", tmp_path / "hub-plus"):
        got = load_state(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), out
    for result in (hub, plus):
        assert list(result.report.coefficients.values()) == list(folders.report.coefficients.values())
        pinned = [i for i in result.provenance["inputs"] if i.get("adapter")]
        assert [i["revision"] for i in pinned] == ["0" * 40, "1" * 40] and all(i["source"] == "hub" for i in pinned)
