"""The one cache of the merge core: content hashes of input files, and per-fine-tune statistics.

``METAMERGE_CACHE_DIR`` (default ``~/.cache/metamerge``) holds

- ``files/``: the sha256 of each input file, keyed by what changes when the file does (device,
  inode, size, mtime in ns); a file of the Hugging Face hub cache is named by its sha256 already
  (``blobs/<sha256>``), so it is never hashed at all;
- ``statistics/``: a fine-tune's per-tensor statistic (MetaGPT's squared task-vector norms), keyed
  by the base's and the fine-tune's content hashes, what the method says the statistic depends on
  (sparsification, seed, dtype...), the tensor set, the device kind and the code version.

So a second merge of the same inputs hashes and norms nothing, and a merge with one more fine-tune
computes that fine-tune's norms only. The CLI and the pipeline both go through this module. Entries
are small JSON files written atomically; a damaged entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from . import __version__

_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    return Path(os.environ.get("METAMERGE_CACHE_DIR") or Path.home() / ".cache" / "metamerge").expanduser()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, value: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache never fails a merge
        pass


def _stat_key(path: Path) -> tuple[Path, dict]:
    st = os.stat(path)
    ident = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return cache_dir() / "files" / f"{st.st_dev}-{st.st_ino}.json", ident


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a hub cache names a (large) file's blob by, when ``path`` links to one."""
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
            return target.name
    return None


def known_sha256(path: Path) -> str | None:
    """The file's sha256 if the cache (or the hub cache's blob name) knows it; no hashing."""
    if (blob := hub_blob_sha256(path)) is not None:
        return blob
    entry_path, ident = _stat_key(path)
    entry = _read(entry_path)
    if entry and {k: entry.get(k) for k in ident} == ident:
        return entry.get("sha256")
    return None


def file_sha256(path: Path, compute) -> str:
    """The file's sha256: from the cache when its (device, inode, size, mtime) are unchanged,
    else ``compute(path)``, remembered."""
    if (known := known_sha256(path)) is not None:
        return known
    entry_path, ident = _stat_key(path)
    digest = compute(path)
    if _stat_key(path)[1] == ident:  # not changed while it was read
        _write(entry_path, {**ident, "sha256": digest})
    return digest


def statistics_key(base_revision: str, model_revision: str, depends_on: dict, names: list[str],
                   device: str) -> str:
    blob = json.dumps({"base": base_revision, "model": model_revision, "depends_on": depends_on,
                       "tensors": hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest(),
                       "device": device, "code": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_statistics(key: str) -> dict[str, float] | None:
    entry = _read(cache_dir() / "statistics" / f"{key}.json")
    return entry.get("values") if entry else None


def store_statistics(key: str, values: dict[str, float], about: dict) -> None:
    _write(cache_dir() / "statistics" / f"{key}.json", {"values": values, **about})
