"""What a watch list adds to a merge: new fine-tunes in watched folders, watched references.

Stateless: the watcher compares what is there now with the recipe, and the merge those exact
revisions would produce (``steps.existing_merge``) tells whether anything changed.
"""

from __future__ import annotations

from pathlib import Path

from metamerge.errors import InputError
from metamerge.refs import ModelRef, is_adapter

from .params import Params


def _local_path(ref: str) -> Path | None:
    m = ModelRef.parse(ref)
    return Path(m.name).expanduser().absolute() if m.is_local() else None


def watched_additions(params: Params) -> list[dict]:
    """Fine-tunes the watch list adds to the recipe: watched references not in it yet, and every
    model folder (one with a config.json) and every PEFT adapter folder (adapter_config.json,
    merged over the recipe's base) under a watched directory; hidden folders are skipped, as
    half-copied ones should be named."""
    r = params.recipe
    known = {m.model for m in r.models} | {r.base_model}
    known_paths = {p for p in map(_local_path, filter(None, known)) if p is not None}
    out: list[dict] = []

    def add(ref: str, parameters: dict) -> None:
        path = _local_path(ref)
        if ref in known or (path is not None and path in known_paths):
            return
        known.add(ref)
        if path is not None:
            known_paths.add(path)
        out.append({"model": ref, "parameters": dict(parameters)} if parameters else {"model": ref})

    for w in params.pipeline.watch_entries():
        if hasattr(w, "ref"):
            add(w.ref, w.parameters)
            continue
        folder = Path(w.dir).expanduser()
        if not folder.is_dir():
            raise InputError(f"{params.source}: watched folder {folder.absolute()} does not exist")
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and \
                    ((sub / "config.json").is_file() or is_adapter(sub)):
                add(str(Path(w.dir) / sub.name), w.parameters)
    return out
