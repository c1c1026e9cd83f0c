"""dvc.yaml in a temporary git repository: the stages run, a second repro does nothing, the merged
model round-trips through a local remote, an eval-only change reruns evaluation only and registers
nothing new, a new merge does not score the unchanged base and experts again, dvc.lock is the same
from another checkout, and metrics/plots diff across commits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline_helpers import params_for

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")
DVC_CACHE = Path(tempfile.mkdtemp(prefix="metamerge-dvc-test-cache-"))


def sh(args: list[str], cwd: Path) -> str:
    # the stages' own norm cache (METAMERGE_CACHE_DIR), so what they compute does not depend on other tests
    env = {**os.environ, "METAMERGE_CACHE_DIR": str(DVC_CACHE), "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_dvc_repro_then_nothing_then_push_pull(tiny_models, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q"], repo)
    sh([DVC, "init", "-q"], repo)
    sh([DVC, "config", "core.analytics", "false"], repo)
    sh([DVC, "config", "core.check_update", "false"], repo)
    sh([DVC, "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    # the project as the stages see it: its code (a dependency), its dvc.yaml, its venv
    for name in ("metamerge", "scenarios", "evaluation", "modelregistry", "pipeline", "tasks", "flows"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pipeline_env.py", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / ".venv").symlink_to(Path(sys.executable).parent.parent)
    data = repo / "data"
    shutil.copytree(tiny_models["base"].parent, data)
    # relative references, as a user writes them: the stages run in the repository root
    rel = {k: Path("data") / Path(v).relative_to(tiny_models["base"].parent) for k, v in tiny_models.items()}
    params = params_for(rel, Path("."), data_dir="data", scenario=None, max_shard_size="5GB", output="model",
                        adapter_rank=None, registry={"tracking_uri": "sqlite:///registry/mlflow.db", "model_name": "tiny-dvc"})
    (repo / ".gitignore").write_text("/registry/\n")
    params["pipeline"]["output_root"] = "outputs"
    rel = {k: str(v) for k, v in rel.items()}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = sh([DVC, "repro"], repo)
    for stage in ("download", "norms", "merge", "evaluate-inputs", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out, out
    assert "Loading weights" not in out and "it/s]" not in out, out  # no third-party bars in stage logs
    work = repo / "outputs" / "dvc"
    model = work / "model"
    assert (model / "model.safetensors").is_file() and (work / "metrics.json").is_file()
    assert (work / "lambdas.png").is_file() and (work / "scores.png").is_file()
    metrics = sh([DVC, "metrics", "show"], repo)
    assert "average_loss_difference" in metrics

    again = sh([DVC, "repro"], repo)
    assert "Running stage" not in again and "didn't change" in again, again
    assert "up to date" in sh([DVC, "status"], repo)
    registry = json.loads((work / "registry.json").read_text())
    assert registry["version"] == "1" and not registry["duplicate"]
    lock = (repo / "dvc.lock").read_text()
    assert str(tmp_path) not in lock and str(tmp_path) not in (work / "pins.json").read_text()
    # the version records this run's lock (every stage before register) and the commit's state
    from mlflow import MlflowClient

    from pipeline.keys import digest

    client = MlflowClient(f"sqlite:///{repo / 'registry' / 'mlflow.db'}")
    tags = client.get_model_version("tiny-dvc", "1").tags
    upstream = {k: v for k, v in yaml.safe_load(lock)["stages"].items() if k != "register"}
    assert tags["dvc_lock_sha256"] == digest(upstream)
    assert tags["git_dirty"] == "true" and tags["git_commit"] == "unknown"  # nothing committed yet
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "first"], repo)

    # the same project in another folder: the same lock, nothing to redo
    other = tmp_path / "other"
    shutil.copytree(repo, other, symlinks=True)
    assert "up to date" in sh([DVC, "status"], other)

    # an eval-only change: the evaluate stages rerun (register too if the scores moved), the merge
    # does not, and no version is added
    params["pipeline"]["eval"]["batch_size"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([DVC, "repro"], repo)
    ran = set(re.findall(r"Running stage '([\w-]+)'", out))
    assert {"evaluate-inputs", "evaluate"} <= ran <= {"evaluate-inputs", "evaluate", "register"}, out
    assert json.loads((work / "registry.json").read_text())["version"] == "1"
    assert len(client.search_model_versions("name = 'tiny-dvc'")) == 1
    diff = sh([DVC, "metrics", "diff", "HEAD", "--all"], repo)
    assert "metrics.json" in diff and "average_loss_difference" in diff, diff
    sh([DVC, "plots", "diff", "HEAD", "-o", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots" / "index.html").is_file()
    sh([DVC, "params", "diff", "HEAD"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "eval batch size"], repo)

    before = tree_hash(model)
    sh([DVC, "push"], repo)
    shutil.rmtree(model)
    sh([DVC, "pull"], repo)
    assert tree_hash(model) == before

    # one more fine-tune: the norms stage reruns, and computes only the new fine-tune's norms
    params["recipe"]["models"].append({"model": rel["ft-d"]})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stats = DVC_CACHE / "statistics"  # the merge core's one norm cache, shared with metamerge merge
    norms_before = set(stats.iterdir())
    out = sh([DVC, "repro", "norms"], repo)
    assert "Running stage 'norms'" in out
    assert len(set(stats.iterdir()) - norms_before) == 1
    assert out.count("norms of ") == 3 + 2  # three read back, one computed (two lines)
    # a new merge: the merged model is scored, the base and the experts (unchanged) are not again
    out = sh([DVC, "repro"], repo)
    ran = set(re.findall(r"Running stage '([\w-]+)'", out))
    assert {"merge", "evaluate"} <= ran and "evaluate-inputs" not in ran, out
    assert re.findall(r"^evaluate (\S+) on ", out, re.M) == ["model"], out  # the merge only
