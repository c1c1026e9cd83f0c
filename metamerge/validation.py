"""One-line errors for the YAML files users write (recipes, params files) and their validation.

Recipes and params files are read and validated the same way, so their errors read the same way:
``SOURCE: unknown key 'a.b': <hint>``, ``SOURCE: missing required key 'a'``,
``SOURCE: bad value for 'a': <why>``, ``PATH: line N is not valid YAML (...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import InputError

UNKNOWN_KEY_HINT = "remove it or check its spelling"


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of a YAML file; an unreadable file or bad YAML is one ``InputError`` line
    (``what`` names the file's kind: "recipe", "params file")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: is not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from None


def first_error(exc: ValidationError, source: str, top: str, *, hints: Mapping[str, str] | None = None,
                prefer_unknown_key: bool = False, hidden_loc: tuple[str, ...] = ()) -> InputError:
    """The first problem pydantic found, as one line (``top`` names the whole document, for an
    error without a location).

    ``hints``: what to say for an unknown key, by key name (default: check its spelling).
    ``prefer_unknown_key``: report an unknown key before other errors; a union (e.g. a list of
    either a string or a mapping) reports a failure per alternative, and the unknown key is the
    useful one. ``hidden_loc``: prefixes of location parts that name union alternatives, left out
    of the reported path.
    """
    errors = exc.errors()
    err = errors[0]
    if prefer_unknown_key:
        err = next((e for e in errors if e["type"] == "extra_forbidden"), err)
    loc = [str(p) for p in err["loc"] if not (hidden_loc and str(p).startswith(hidden_loc))]
    where = ".".join(loc) or top
    if err["type"] == "extra_forbidden":
        hint = (hints or {}).get(str(err["loc"][-1]), UNKNOWN_KEY_HINT)
        return InputError(f"{source}: unknown key '{where}': {hint}")
    if err["type"] == "missing":
        return InputError(f"{source}: missing required key '{where}'")
    msg = err["msg"].removeprefix("Value error, ")
    return InputError(f"{source}: bad value for '{where}': {msg}")
