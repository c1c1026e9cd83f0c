"""``metamerge merge``: exit status 0 and a merged model, or 2 and exactly one ``error:`` line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metamerge.cli import main

from models import assert_nothing_written, load_state, pickled, run_merge, write_recipe


def recipe_for(fam, **top):
    return {"merge_method": "metagpt", "base_model": str(fam.base),
            "models": [{"model": r} for r in fam.refs], **top}


def cli(*args) -> int:
    return main(["merge", *map(str, args), "--no-progress"])


def shards(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors*"))}


def test_merge_writes_and_returns_0(tiny_llama_fp32, tmp_path, capsys):
    fam = tiny_llama_fp32
    path = write_recipe(tmp_path / "recipe.yaml", recipe_for(fam))
    text = path.read_text() + "# a comment kept verbatim\n"
    path.write_text(text)
    out = tmp_path / "out"
    assert cli(path, out, "--device", "cpu", "--max-shard-size", "10KB") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"wrote {out} (")
    report = json.loads((out / "merge_report.json").read_text())
    for ref in fam.refs:  # one line per fine-tune with its lambda
        assert f"  {ref}: {report['model']['lambdas'][ref]:.6f}" in captured.out.splitlines()
    assert (out / "merge_recipe.yaml").read_text() == text
    assert len(shards(out)) > 2
    # the command line and the API give the same bytes
    run_merge(recipe_for(fam), tmp_path / "api", max_shard_size="10KB")
    assert shards(out) == shards(tmp_path / "api")


def test_device_auto(tiny_llama_bf16, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe_for(tiny_llama_bf16))
    assert cli(path, tmp_path / "out", "--device", "auto") == 0
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("content,fragments", [
    ("merge_method: metagpt\nbase_model: BASE\nmodels:\n  - model: FT0\nparamters: {}\n",
     ["unknown key 'paramters'", "check its spelling"]),
    ("merge_method: metagpt\nbase_model: BASE\nmodels: [model: FT0\n", ["line", "is not valid YAML"]),
    ("- just\n- a list\n", ["a recipe must be a YAML mapping"]),
    ("merge_method: metagpt\nbase_model: BASE\nmodels:\n  - model: FT0\nparameters: {density: 1.5}\n",
     ["bad value 1.5 for 'density'"]),
    ("merge_method: metagpt\nbase_model: BASE\nmodels:\n  - model: MISSING\n", ["no such directory"]),
    ("merge_method: mystery\nbase_model: BASE\nmodels:\n  - model: FT0\n", ["unknown merge_method 'mystery'"]),
], ids=["unknown-key", "bad-yaml", "not-a-mapping", "bad-value", "missing-model", "unknown-method"])
def test_bad_recipe_returns_2_with_one_line(content, fragments, tiny_llama_bf16, tmp_path, capsys):
    fam = tiny_llama_bf16
    content = (content.replace("BASE", str(fam.base)).replace("FT0", fam.refs[0])
               .replace("MISSING", str(tmp_path / "missing")))
    path = tmp_path / "recipe.yaml"
    path.write_text(content)
    out = tmp_path / "out"
    assert cli(path, out) == 2
    line = one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert_nothing_written(out)


def test_missing_recipe_file(tmp_path, capsys):
    assert cli(tmp_path / "nope.yaml", tmp_path / "out") == 2
    assert "cannot read recipe" in one_error_line(capsys)
    assert_nothing_written(tmp_path / "out")


def test_existing_output_and_overwrite(tiny_llama_bf16, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe_for(tiny_llama_bf16))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli(path, out) == 2
    assert "already exists" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli(path, out, "--overwrite") == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_allow_pickle_flag(tiny_llama_bf16, tmp_path, capsys):
    fam = tiny_llama_bf16
    pk = pickled(fam.finetunes[1], tmp_path / "pk")
    recipe = recipe_for(fam)
    recipe["models"][1]["model"] = str(pk)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert cli(path, tmp_path / "out") == 2
    assert "--allow-pickle" in one_error_line(capsys)
    assert_nothing_written(tmp_path / "out")
    assert cli(path, tmp_path / "out", "--allow-pickle") == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_device_cuda_without_gpu(tiny_llama_bf16, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe_for(tiny_llama_bf16))
    assert cli(path, tmp_path / "out", "--device", "cuda") == 2
    assert one_error_line(capsys) == ("error: --device cuda: no CUDA GPU is visible to torch; "
                                      "use --device cpu or auto")
    assert_nothing_written(tmp_path / "out")


def test_dry_run_plans_and_writes_nothing(tiny_llama_tied_head, tmp_path, capsys, monkeypatch):
    fam = tiny_llama_tied_head
    monkeypatch.setenv("METAMERGE_CACHE_DIR", str(tmp_path / "cache"))  # no norms cached by earlier tests
    path = write_recipe(tmp_path / "recipe.yaml", recipe_for(fam, out_dtype="bfloat16"))
    out = tmp_path / "out"
    assert cli(path, out, "--dry-run") == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    base = load_state(fam.base)
    assert plan["ok"] is True and plan["method"] == "metagpt"
    assert plan["tensors"] == len(base)
    assert plan["output_bytes"] == sum(t.numel() * 2 for t in base.values())  # bf16 out
    assert plan["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert plan["vocab_rows_shared"] == {}
    # the cost: every input's float32 tensors but the tied head, read twice (norm pass, merge)
    est = plan["estimate"]
    per_input = sum(t.numel() * 4 for n, t in base.items() if n != "lm_head.weight")
    assert [i["read_bytes"] for i in est["inputs"]] == [per_input] * 3
    assert est["passes"] == ["statistics", "merge"] and est["read_bytes"] == 2 * 3 * per_input
    assert est["write_bytes"] == plan["output_bytes"]
    largest = max((n for n in base if n != "lm_head.weight"), key=lambda n: base[n].numel())
    assert est["largest_tensor"] == largest
    # 3 float32 inputs + MetaGPT's 2 work buffers + the bf16 output, above the process itself
    assert est["peak_memory_bytes"] == 300_000_000 + base[largest].numel() * (4 * 5 + 2)
    lines = captured.err.splitlines()
    assert lines[0] == "method metagpt; passes: statistics, merge"
    assert lines[1] == f"input base '{fam.base}': {per_input / 1024:.2f} KiB per pass"
    assert any(line.startswith("peak memory about 286.") for line in lines) and lines[-1].startswith("time about")
    assert_nothing_written(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_console_script(tiny_llama_bf16, tmp_path):
    """The installed ``metamerge`` entry point, in a process of its own."""
    exe = Path(sys.executable).with_name("metamerge")
    assert exe.exists(), f"console script missing beside {sys.executable}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    good = write_recipe(tmp_path / "good.yaml", recipe_for(tiny_llama_bf16))
    out = tmp_path / "out"
    proc = subprocess.run([str(exe), "merge", str(good), str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}")
    assert proc.stderr == ""  # no progress bars when stderr is not a terminal
    merged = load_state(out)
    assert sorted(merged) == sorted(load_state(tiny_llama_bf16.base))
    bad = write_recipe(tmp_path / "bad.yaml", {**recipe_for(tiny_llama_bf16), "merge_method": "nope"})
    proc = subprocess.run([str(exe), "merge", str(bad), str(tmp_path / "out2")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "unknown merge_method 'nope'" in proc.stderr
    assert_nothing_written(tmp_path / "out2")


def test_version_and_help_on_every_argument(capsys):
    import argparse

    from metamerge import __version__
    from metamerge.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"metamerge {__version__}"
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, *subs.choices.values()):
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help"


def test_mergekit_flags_are_accepted_with_a_note(tiny_llama_fp32, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe_for(tiny_llama_fp32))
    assert cli(path, tmp_path / "out", "--copy-tokenizer", "--lazy-unpickle") == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --copy-tokenizer (mergekit): the tokenizer is always copied "
                   "(recipe tokenizer_source: base by default)",
                   "note: --lazy-unpickle (mergekit): tensors are always streamed from safetensors; "
                   "pickles need --allow-pickle"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
