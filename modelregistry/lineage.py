"""Lineage of a registration: the project's commit, the DVC lock, the flow run, every input's revision.

These become tags on the MLflow run and on the registered version (``lineage_tags``), so a version
says where it came from without opening any artifact.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metamerge.errors import MergeError
from metamerge.refs import sha256_file

from .metrics import mlflow_key

MAX_TAG = 7000


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(start: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding ``start`` (default: the working directory, where
    ``dvc repro`` and the flows run, then this project), by ``git rev-parse HEAD`` and
    ``git status --porcelain`` (untracked files count as dirty: they can change a run); ``(None,
    None)`` without git, a repository or a commit."""
    starts = [Path(start)] if start else [Path.cwd(), Path(__file__).resolve().parent.parent]
    for s in starts:
        if _git(["rev-parse", "--is-inside-work-tree"], s) is None:
            continue  # not a repository: try the next place
        head = _git(["rev-parse", "--verify", "-q", "HEAD"], s)
        status = _git(["status", "--porcelain"], s)
        return (head.strip() if head else None), (None if status is None else bool(status.strip()))
    return None, None


def git_commit(start: str | Path | None = None) -> str | None:
    """The commit checked out where ``start`` is (see :func:`git_state`)."""
    return git_state(start)[0]


def files_digest(files: Mapping[str, str]) -> str:
    """Same construction as ``metamerge.refs.hash_model_dir``: the revision of a local directory."""
    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()


def lineage_tags(lineage: Mapping[str, Any], provenance: Mapping[str, Any], provenance_sha256: str) -> dict[str, str]:
    """Tags for the run and the registered version (see module docstring)."""
    lineage = dict(lineage or {})
    tags: dict[str, str] = {}
    commit, dirty = git_state()
    if given := lineage.pop("git_commit", None):
        commit, dirty = given, lineage.pop("git_dirty", None)
    tags["git_commit"] = commit or "unknown"
    tags["git_dirty"] = "unknown" if dirty is None else str(bool(dirty)).lower()
    dvc_sha = lineage.pop("dvc_lock_sha256", None)
    dvc_lock = lineage.pop("dvc_lock", None)
    if not dvc_sha:
        lock = Path(dvc_lock) if dvc_lock else Path.cwd() / "dvc.lock"
        if lock.is_file():
            dvc_sha = sha256_file(lock)
        elif dvc_lock:
            raise MergeError(f"lineage dvc_lock: no such file {lock}")
    if dvc_sha:
        tags["dvc_lock_sha256"] = str(dvc_sha)
    flow_run = lineage.pop("prefect_flow_run_id", None)
    if flow_run:
        tags["prefect_flow_run_id"] = str(flow_run)
    tags["recipe_sha256"] = str(provenance.get("recipe_sha256", ""))
    tags["provenance_sha256"] = provenance_sha256
    tags["tokenizer_source"] = str(provenance.get("tokenizer_source", ""))
    tags["output"] = str(provenance.get("output", "model"))  # "lora_adapter": merge --as-adapter
    for i, item in enumerate(provenance.get("inputs", [])):
        p = f"input.{i}."
        tags[p + "role"] = str(item.get("role", ""))
        tags[p + "ref"] = str(item.get("ref", ""))
        tags[p + "revision"] = str(item.get("revision", ""))
        tags[p + "source"] = str(item.get("source", ""))
        if item.get("adapter"):  # a LoRA adapter: the base it was applied to is part of its lineage
            tags[p + "adapter_base"] = str(item.get("base_ref") or "")
        files = item.get("files") or {}
        if files:
            tags[p + "files_sha256"] = files_digest(files)
            text = json.dumps(files, sort_keys=True, separators=(",", ":"))
            if len(text) <= MAX_TAG:  # the full list is always in provenance.json and lineage.json
                tags[p + "files"] = text
    for key, value in lineage.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        tags[f"lineage.{mlflow_key(str(key))}"] = text[:MAX_TAG]
    return tags

