"""Outputs appear whole or not at all.

Everything is written into a hidden temporary sibling of the target and renamed into place at the
end, so an interrupted run leaves no half-written directory and never clobbers an existing one
unless asked to.

Permissions follow the user's umask, as a plain ``open``/``mkdir`` would: the temporary names come
from ``tempfile``, which makes them private (0700 directories, 0600 files) so that no one reads a
half-written output; once renamed into place they would stay private, and a serving account in the
same group could not read the merged model. They are set to ``0o777``/``0o666`` minus the umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import MergeError


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block exits cleanly."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise MergeError(f"{target} already exists; choose another output directory or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yield a file open on a temporary sibling of ``path`` (``mode`` ``"w"``: UTF-8 text, ``"wb"``:
    bytes) that replaces ``path`` when the block exits cleanly; readers never see half a file."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode {mode!r}; use 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with (os.fdopen(fd, "w", encoding="utf-8", newline="") if mode == "w" else os.fdopen(fd, "wb")) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file via a temporary sibling and ``os.replace``."""
    with atomic_file(path) as fh:
        fh.write(text)
    return Path(path)
