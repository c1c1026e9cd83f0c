"""The content keys behind every cache: the same content gives the same key whatever the output
root, and the code's version follows the code (git's object ids in a checkout, the package's
version outside one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline import keys, steps, store
from pipeline.params import load_params

from pipeline_helpers import params_for

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def test_keys_do_not_change_with_the_output_root(tiny_models, tmp_path):
    a = load_params(params_for(tiny_models, tmp_path / "a", materialize_task_vectors=True))
    b = load_params(params_for(tiny_models, tmp_path / "b", materialize_task_vectors=True))
    assert a.output_root != b.output_root
    pins = {ref: steps.pin(ref) for ref in keys.input_refs(a)}
    ref = str(tiny_models["ft-a"])
    info = {"revision": "r1", "model_dir": str(store.merge_dir(a, pins))}
    scores = {"merged": {"add": {"loss": 1.0}}}
    for key in (keys.merge_key, lambda p, q: keys.task_vectors_step_key(p, q, ref),
                lambda p, q: keys.norms_key(p, q, ref, "cpu"), lambda p, q: keys.eval_key(p, "rev"),
                lambda p, q: keys.benchmark_key(p, "rev"), lambda p, q: keys.report_key(p, info, scores),
                lambda p, q: keys.register_key(p, info, {})):
        assert key(a, pins) == key(b, pins)
    # the folders are named by those keys, under each root
    assert store.merge_dir(a, pins).name == store.merge_dir(b, pins).name
    assert store.merge_dir(a, pins).parent != store.merge_dir(b, pins).parent
    # what the step reads changes its key: a streamed task vector is another result than a written one
    streamed = load_params(params_for(tiny_models, tmp_path / "a"))
    assert keys.task_vectors_step_key(streamed, pins, ref) != keys.task_vectors_step_key(a, pins, ref)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture
def code_at(monkeypatch):
    """``keys.code_version`` of the project at a given root (its per-process cache cleared)."""
    def version(root: Path, kind: str = "engine") -> str:
        monkeypatch.setattr(keys, "PROJECT_ROOT", root)
        keys.code_version.cache_clear()
        return keys.code_version(kind)

    yield version
    keys.code_version.cache_clear()


def test_code_version_follows_the_code_in_a_git_checkout(tmp_path, code_at):
    repo = tmp_path / "repo"
    (repo / "metamerge").mkdir(parents=True)
    (repo / "pipeline").mkdir()
    (repo / "metamerge" / "plan.py").write_text("X = 1\n")
    (repo / "metamerge" / "cli.py").write_text("# only reads and reports\n")
    (repo / "pipeline" / "steps.py").write_text("STEPS = 1\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    first = code_at(repo)

    (repo / "metamerge" / "plan.py").write_text("X = 2\n")  # an uncommitted edit
    edited = code_at(repo)
    assert edited != first
    _git(repo, "commit", "-q", "-am", "edit")
    assert code_at(repo) == edited  # the same code, committed: the same version
    (repo / "metamerge" / "plan.py").write_text("X = 1\n")  # reverted (uncommitted): the first again
    assert code_at(repo) == first

    (repo / "metamerge" / "new_module.py").write_text("Y = 1\n")  # a new, untracked engine module counts
    assert code_at(repo) != first
    (repo / "metamerge" / "new_module.py").unlink()
    (repo / "metamerge" / "__pycache__").mkdir()  # ignored files do not
    (repo / "metamerge" / "__pycache__" / "plan.cpython-311.pyc").write_bytes(b"\0")
    (repo / "metamerge" / "cli.py").write_text("# edited, but the engine does not depend on it\n")
    assert code_at(repo) == first
    (repo / "pipeline" / "steps.py").write_text("STEPS = 2\n")  # the steps count for both kinds
    assert code_at(repo) != first
    assert code_at(repo, "evaluate") != code_at(repo, "engine")


def test_code_version_outside_git_is_the_package_version(tmp_path, code_at):
    import importlib.metadata

    import torch

    for root in (tmp_path / "x", tmp_path / "y"):
        (root / "metamerge").mkdir(parents=True)
        (root / "metamerge" / "plan.py").write_text(f"# {root.name}\n")
    assert code_at(tmp_path / "x") == code_at(tmp_path / "y") == keys.digest({
        "code": {"metamerge": importlib.metadata.version("metamerge")},
        "torch": torch.__version__.split("+")[0]})[:16]
