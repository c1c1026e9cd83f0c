"""Fault suite: the same recipe gives the same bytes whatever the CPU thread count.

Each merge runs in its own interpreter with ``torch.set_num_threads(1)`` and ``(2)``. The models
have tensors past ATen's parallel grain (32768 entries): below it torch reduces on one thread and
no thread count can show a difference. Whole-tensor sums (squared norms, L1 rescale, Karcher and
spherical norms and dots) used to split across threads and changed lambdas and rescale factors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_tokenizer, make_model, perturb, save

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "metagpt": ("metagpt", {}, {}),
    "metagpt_dare": ("metagpt", {"sparsify": "dare"}, {"density": 0.5}),
    "dare_ties": ("dare_ties", {}, {"density": 0.5, "weight": 1.0}),
    "della": ("della", {}, {"density": 0.5, "weight": 1.0, "epsilon": 0.1}),
    "karcher": ("karcher", {}, {}),
    "nuslerp": ("nuslerp", {}, {"weight": 1.0}),
}
RUNNER = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from models import run_merge
for out, recipe in json.loads(sys.argv[3]).items():
    run_merge(recipe, out)
"""


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """A bfloat16 llama whose embedding and head have 65536 entries, and three fine-tunes."""
    root = tmp_path_factory.mktemp("wide")
    base = make_model("llama", seed=5, vocab=4096)
    save(base, root / "base", dtype=torch.bfloat16, tokenizer=build_tokenizer(4096))
    for k in range(3):
        save(perturb(base, seed=77 + k, scale=0.01 * (k + 1), skip=lambda n: False), root / f"ft{k}",
             dtype=torch.bfloat16)
    return root


def _recipe(root: Path, case: str) -> dict:
    method, globals_, per = CASES[case]
    n = 2 if method == "nuslerp" else 3
    recipe = {"merge_method": method, "base_model": str(root / "base"), "dtype": "bfloat16",
              "models": [{"model": str(root / f"ft{k}"), **({"parameters": per} if per else {})} for k in range(n)]}
    if globals_:
        recipe["parameters"] = globals_
    return recipe


def _merge_all(root: Path, out: Path, threads: int) -> dict[str, bytes]:
    recipes = {str(out / case): _recipe(root, case) for case in CASES}
    subprocess.run([sys.executable, "-c", RUNNER, str(threads), str(ROOT / "tests"), json.dumps(recipes)],
                   check=True, cwd=ROOT, capture_output=True)
    return {case: (out / case / "model.safetensors").read_bytes() for case in CASES}


def test_same_bytes_on_one_and_two_threads(wide_family, tmp_path):
    one = _merge_all(wide_family, tmp_path / "t1", 1)
    two = _merge_all(wide_family, tmp_path / "t2", 2)
    differing = [case for case in CASES if one[case] != two[case]]
    assert differing == []


def test_provenance_records_what_can_still_change_the_bytes(wide_family, tmp_path):
    from models import run_merge

    result = run_merge(_recipe(wide_family, "metagpt"), tmp_path / "out")
    env = result.provenance["environment"]
    assert env["torch_threads"] == torch.get_num_threads() and env["thread_count_changes_bytes"] is False
    assert set(result.provenance["versions"]) >= {"torch", "safetensors", "metamerge"}
    assert result.provenance["device"] == "cpu"


def test_a_mismatch_names_the_differing_tensors_and_the_likely_cause(wide_family, tmp_path):
    from safetensors.torch import load_file, save_file

    from modelregistry.compare import likely_cause, tensor_differences

    from models import run_merge

    run_merge(_recipe(wide_family, "metagpt"), tmp_path / "a")
    state = load_file(str(tmp_path / "a" / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    state["lm_head.weight"][0, 0] += 0.5
    (tmp_path / "b").mkdir()
    save_file(state, str(tmp_path / "b" / "model.safetensors"), metadata={"format": "pt"})
    diffs = tensor_differences(tmp_path / "a", tmp_path / "b")
    assert [d["tensor"] for d in diffs] == ["lm_head.weight"]
    assert diffs[0]["max_abs_diff"] == pytest.approx(0.5, abs=0.01)
    assert likely_cause(["torch 2.14.0 here, 2.13.0 when recorded"], diffs) == "torch 2.14.0 here, 2.13.0 when recorded"
    assert "an input changed on disk" in likely_cause([], diffs)
