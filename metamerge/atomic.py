"""Outputs appear whole or not at all.

Everything is written into a hidden temporary sibling of the target and renamed into place at the
end, so an interrupted run leaves no half-written directory and never clobbers an existing one
unless asked to.

One writer per target: :func:`out_lock` holds an exclusive ``flock`` on ``.<name>.lock`` beside it
(the kernel drops it when the process dies, so a killed merge never leaves a stale lock). Under
that lock, any ``.<name>.tmp-*``/``.<name>.old-*`` sibling belongs to a dead process and is removed.
The final rename refuses to replace a directory that appeared meanwhile unless ``overwrite``.

Permissions follow the user's umask, as a plain ``open``/``mkdir`` would: the temporary names come
from ``tempfile``, which makes them private (0700 directories, 0600 files) so that no one reads a
half-written output; once renamed into place they would stay private, and a serving account in the
same group could not read the merged model. They are set to ``0o777``/``0o666`` minus the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import MergeError

_HELD: set[Path] = set()


@contextlib.contextmanager
def out_lock(target: str | os.PathLike, *, wait: bool = False, keep: str | None = None) -> Iterator[Path]:
    """Hold the one-writer lock of ``target`` (fail at once when another process holds it, or
    ``wait`` for it); remove the staging that dead writers left, except the sibling named ``keep``
    (a resumable merge's staging of the same plan). Re-entrant within a process."""
    target = Path(target).absolute()
    if target in _HELD:
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MergeError(f"{target}: another merge (pid {holder}) is writing this output now; wait for it "
                             "to finish, choose another output directory, or pass --wait") from None
        try:  # the previous holder may have removed the lock file while we waited: lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _remove_stale(target, keep)
        _HELD.add(target)
        yield target
    finally:
        _HELD.discard(target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _remove_stale(target: Path, keep: str | None = None) -> None:
    """Staging of ``target`` left by writers that died (SIGKILL, power loss): only called under the
    lock, so no live process owns it. A resumable staging (``stage-``) of another plan (another
    recipe, changed inputs) can never be reused, so it goes too; ``keep`` is the current plan's."""
    for p in target.parent.glob(f".{target.name}.*-*"):
        if p.name == keep:
            continue
        if p.is_dir() and p.name.split(".")[-1].startswith(("tmp-", "old-", "stage-")) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails with FileExistsError when ``dst`` exists (Linux ``renameat2``), so a
    directory created by someone else after our check is never silently replaced."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


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
    with out_lock(target):
        with _staging(target, overwrite) as tmp:
            yield tmp


@contextlib.contextmanager
def _staging(target: Path, overwrite: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        publish(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished directory ``tmp`` to ``target`` in one step (replacing an existing
    ``target`` only when ``overwrite``; never one that appeared meanwhile otherwise)."""
    if target.exists() and not overwrite:
        raise MergeError(f"{target} appeared while this merge ran; it was left as it is (pass --overwrite "
                         "to replace it)")
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            raise MergeError(f"{target} appeared while this merge ran; it was left as it is (pass "
                             "--overwrite to replace it)") from None


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
