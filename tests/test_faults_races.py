"""Fault suite: races on one output directory, and --overwrite onto an input.

The lock a merge holds is the real one (``metamerge.atomic.out_lock``, a kernel ``flock``); the
test process holds it to stand for a first merge still running while a second one starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metamerge.atomic import atomic_directory, out_lock
from metamerge.errors import MergeError

from models import load_state, run_merge, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(fam) -> dict:
    return {"merge_method": "metagpt", "base_model": str(fam.base), "models": [{"model": m} for m in fam.refs]}


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "metamerge.cli", "merge", *args, "--no-progress", "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_merge_to_the_same_out_fails_at_once(tiny_llama_bf16, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama_bf16))
    out = tmp_path / "out"
    with out_lock(out):  # a first merge is writing OUT
        proc = _cli(str(recipe), str(out))
        _, err = proc.communicate()
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and f"pid {os.getpid()}" in err and "another merge" in err and "--wait" in err
    assert not out.exists()


def test_a_second_merge_asked_to_wait_runs_after_the_first(tiny_llama_bf16, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama_bf16))
    out = tmp_path / "out"
    with out_lock(out):
        proc = _cli(str(recipe), str(out), "--wait")
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert set(load_state(out)) == set(load_state(tiny_llama_bf16.base))
    assert not (tmp_path / ".out.lock").exists()


def test_the_final_rename_never_replaces_a_directory_that_appeared(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(MergeError, match="appeared while this merge ran"):
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_text("ours")
            target.mkdir()  # someone else's (empty) output, created meanwhile
    assert target.is_dir() and list(target.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_overwrite_refuses_an_out_over_an_input(tiny_llama_bf16, tmp_path, where):
    import shutil

    fam_root = tmp_path / "family"
    shutil.copytree(tiny_llama_bf16.base.parent, fam_root)
    recipe = {"merge_method": "metagpt", "base_model": str(fam_root / "base"),
              "models": [{"model": str(fam_root / p.name)} for p in tiny_llama_bf16.finetunes]}
    out = {"is": fam_root / "base", "inside": fam_root / "base" / "merged", "contains": fam_root}[where]
    before = sorted(p.name for p in (fam_root / "base").iterdir())
    with pytest.raises(MergeError, match=r"the output directory (is|contains|lies inside) the input"):
        run_merge(recipe, out, overwrite=True)
    assert sorted(p.name for p in (fam_root / "base").iterdir()) == before


def test_staging_left_by_a_dead_merge_is_removed_on_the_next_run(tiny_llama_bf16, tmp_path):
    out = tmp_path / "out"
    stale = [tmp_path / ".out.tmp-k1ll3d", tmp_path / ".out.old-k1ll3d"]
    for d in stale:  # what SIGKILL leaves: staging nobody owns (its process is gone with its lock)
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / ".other.tmp-keepme").mkdir()  # another output's staging is not ours to remove
    run_merge(_recipe(tiny_llama_bf16), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keepme", "out"]
