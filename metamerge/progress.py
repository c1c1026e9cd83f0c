"""Progress: bars for a person watching a terminal, plain lines for a log that asks for them.

A bar in a log file, a CI run, a batch job or captured test output is noise, so every bar of the
project is drawn only when it is asked for *and* stderr is a terminal. A disabled bar still
accepts ``update`` and ``set_postfix``, so callers never branch on it.

A log that wants to follow the work (an orchestrator's run logger, a pipeline stage's output)
installs a sink with :func:`report_to`; while it is installed, every progress bar that is not drawn on a
terminal reports instead as one line per tenth of its total (``merge: 30% (1.2 GB of 4.0 GB)``),
and every :func:`note` goes to the sink too. Steps of a tenth give a steady rhythm whatever the
size of the work, and the same lines for the same work (the tests compare them). The sink is a
context variable: it covers the thread (or task) that installed it, not the whole process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from tqdm import tqdm

Sink = Callable[[str], None]
_SINK: ContextVar[Sink | None] = ContextVar("metamerge_progress_sink", default=None)
STEPS = 10  # lines per bar: one per tenth


def wanted(enabled: bool) -> bool:
    """Whether to show progress: asked for, and stderr is a terminal."""
    try:
        return bool(enabled) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


@contextlib.contextmanager
def report_to(sink: Sink) -> Iterator[Sink]:
    """Send progress to ``sink`` (one line per tenth of each bar, and every note) meanwhile."""
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def _amount(n: float, unit: str, scale: bool) -> str:
    if not scale:
        return f"{n:g}" if unit == "it" else f"{n:g} {unit}"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {unit}" if not prefix else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


class LineProgress:
    """A tqdm stand-in that writes one line to a sink at each tenth of ``total`` (and at the end)."""

    def __init__(self, total: int, desc: str, sink: Sink, *, unit: str = "it", unit_scale: bool = False):
        self.total, self.desc, self.sink = max(int(total), 0), desc, sink
        self.unit, self.unit_scale = unit, unit_scale
        self.n: float = 0
        self.postfix = ""
        self._next = 1  # the next tenth to report

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.total:
            return
        tenth = min(STEPS, int(self.n * STEPS // self.total))
        if tenth >= self._next:
            self._next = tenth + 1
            done = f"{_amount(self.n, self.unit, self.unit_scale)} of {_amount(self.total, self.unit, self.unit_scale)}"
            self.sink(f"{self.desc}: {tenth * 100 // STEPS}% ({done}){self.postfix}")

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: bool = True, *, unit: str = "it",
                 unit_scale: bool = False) -> tqdm | LineProgress:
    """A ``tqdm`` bar (a context manager) that draws only when :func:`wanted`; else, with a sink
    installed (:func:`report_to`), a :class:`LineProgress` that reports to it."""
    sink = _SINK.get()
    if sink is not None and not wanted(enabled):
        return LineProgress(total, desc, sink, unit=unit, unit_scale=unit_scale)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, dynamic_ncols=True,
                disable=not wanted(enabled))


def note(enabled: bool, message: str) -> None:
    """A progress line: to the sink when one is installed, else on stderr under a bar's condition."""
    sink = _SINK.get()
    if sink is not None:
        sink(message)
    elif wanted(enabled):
        print(message, file=sys.stderr, flush=True)
