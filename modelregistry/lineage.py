"""Lineage of a registration: the project's commit, the DVC lock, the flow run, every input's revision.

These become tags on the MLflow run and on the registered version (``lineage_tags``), so a version
says where it came from without opening any artifact.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metamerge.errors import MergeError
from metamerge.refs import sha256_file

from .metrics import mlflow_key

MAX_TAG = 7000


def _git_dir(start: Path) -> Path | None:
    for d in (start, *start.parents):
        g = d / ".git"
        if g.is_dir():
            return g
        if g.is_file():
            text = g.read_text(encoding="utf-8", errors="replace").strip()
            if text.startswith("gitdir:"):
                p = Path(text[len("gitdir:"):].strip())
                return p if p.is_absolute() else (d / p).resolve()
    return None


def git_commit(start: str | Path | None = None) -> str | None:
    """The commit checked out in the repository holding ``start`` (default: this project, then the
    working directory), read from ``.git`` files directly (no ``git`` binary needed); ``None`` if
    there is no repository or no commit yet."""
    starts = [Path(start)] if start else [Path(__file__).resolve().parent.parent, Path.cwd()]
    for s in starts:
        gitdir = _git_dir(s.absolute())
        if gitdir is None:
            continue
        try:
            head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40,64}", head) else None
        ref = head[len("ref:"):].strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text(encoding="utf-8").strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
        return None
    return None


def _files_digest(files: Mapping[str, str]) -> str:
    """Same construction as ``metamerge.refs.hash_model_dir``: the revision of a local directory."""
    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()


def lineage_tags(lineage: Mapping[str, Any], provenance: Mapping[str, Any], provenance_sha256: str) -> dict[str, str]:
    """Tags for the run and the registered version (see module docstring)."""
    lineage = dict(lineage or {})
    tags: dict[str, str] = {}
    commit = lineage.pop("git_commit", None) or git_commit()
    tags["git_commit"] = commit or "unknown"
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
    for i, item in enumerate(provenance.get("inputs", [])):
        p = f"input.{i}."
        tags[p + "role"] = str(item.get("role", ""))
        tags[p + "ref"] = str(item.get("ref", ""))
        tags[p + "revision"] = str(item.get("revision", ""))
        tags[p + "source"] = str(item.get("source", ""))
        files = item.get("files") or {}
        if files:
            tags[p + "files_sha256"] = _files_digest(files)
            text = json.dumps(files, sort_keys=True, separators=(",", ":"))
            if len(text) <= MAX_TAG:  # the full list is always in provenance.json and lineage.json
                tags[p + "files"] = text
    for key, value in lineage.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        tags[f"lineage.{mlflow_key(str(key))}"] = text[:MAX_TAG]
    return tags

