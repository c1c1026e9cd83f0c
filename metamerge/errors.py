"""The errors users see: a single line naming what is wrong and how to fix it.

``MergeError`` is the base: every command line prints ``error: <message>`` and exits with status 2,
with no traceback, because the fix is in the input or the environment, not in the code. The
subclasses say what kind of problem it is, so callers decide by type, never by message or name:
a retry policy retries ``TransientSourceError`` and nothing else of this family.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class MergeError(Exception):
    """A problem with the user's input (recipe, models, files) or sources, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(MergeError):
    """Bad user input: a recipe, params file, path, device or reference that cannot work as given."""


class EvalSetError(InputError, ValueError):
    """A malformed eval set (JSONL file or in-memory examples); a ``ValueError`` too, as before."""


class TransientSourceError(MergeError):
    """A model source failed in a way that may pass (network down, hub 5xx/429, timeout): retry."""


def run_cli(command: Callable[[], int | None]) -> int:
    """Run a command-line ``command`` and return its exit status; a ``MergeError`` becomes one
    ``error: ...`` line on stderr and status 2. Every command line of the project goes through this."""
    try:
        return int(command() or 0)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
