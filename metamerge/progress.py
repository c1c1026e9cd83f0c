"""Progress bars for a person watching a terminal, and nothing anywhere else.

A bar in a log file, a CI run, a batch job or captured test output is noise, so every bar of the
project is drawn only when it is asked for *and* stderr is a terminal. A disabled bar still
accepts ``update`` and ``set_postfix``, so callers never branch on it.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def wanted(enabled: bool) -> bool:
    """Whether to show progress: asked for, and stderr is a terminal."""
    try:
        return bool(enabled) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def progress_bar(total: int, desc: str, enabled: bool = True, *, unit: str = "it",
                 unit_scale: bool = False) -> tqdm:
    """A ``tqdm`` bar (a context manager) that draws only when :func:`wanted`."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, dynamic_ncols=True,
                disable=not wanted(enabled))


def note(enabled: bool, message: str) -> None:
    """A progress line on stderr, under the same condition as a bar."""
    if wanted(enabled):
        print(message, file=sys.stderr, flush=True)
