"""A model folder is untrusted input: which of its entries may be read at all.

A model downloaded from anywhere can hold a ``tokenizer.json`` that is a symlink to a secret, or an
index naming ``/etc/passwd`` or ``../other/model.safetensors``; read, hashed into the provenance and
copied into OUT, the secret would end up uploaded to the registry. A file of the folder is read
only when it is a plain name directly inside the folder and is a regular file there, or a symlink
whose target stays inside the folder or is a blob of the Hugging Face cache's own store (a hub
snapshot ``models--org--name/snapshots/REV/x`` links to ``models--org--name/blobs/HASH``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MergeError


def plain_name(name: object) -> bool:
    """A bare file name: no directory part, not ``.``/``..``, not absolute, not empty."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not Path(name).is_absolute())


def _allowed_target(folder: Path, target: Path) -> bool:
    root = folder.resolve()
    if target.is_relative_to(root):
        return True
    # the hub cache: <repo>/snapshots/<rev> links into <repo>/blobs/<hash>
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def own_file(folder: Path, path: Path) -> bool:
    """True when ``path`` (an entry directly in ``folder``) may be read as a file of the model."""
    if path.parent != folder or not plain_name(path.name) or not path.is_file():
        return False
    if not path.is_symlink():
        return True
    return _allowed_target(folder, path.resolve())


def checked_file(folder: Path, name: object, label: str, what: str, kind: str = "file") -> Path:
    """``folder / name`` when it is the model's own file, else a one-line error naming it."""
    if not plain_name(name):
        raise MergeError(f"{label}: {what} names {name!r}, not a plain file name inside the model folder; "
                         "fix or re-download the model")
    path = folder / str(name)
    if not path.exists():
        raise MergeError(f"{label}: {kind} {path.name} named in {what} is missing; re-download the model")
    if not own_file(folder, path):
        raise MergeError(f"{label}: {path.name} is a link out of the model folder or not a regular file; "
                         "replace it with the file itself")
    return path
