"""The errors users see: a single line naming what is wrong and how to fix it.

``MergeError`` is the base: every command line prints ``error: <message>`` and exits with status 2,
with no traceback, because the fix is in the input or the environment, not in the code. The
subclasses say what kind of problem it is, so callers decide by type, never by message or name:
a retry policy retries ``TransientSourceError`` and nothing else of this family.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Callable, Iterator

DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


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


class Stopped(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, through every ``finally``."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them as usual.

    Why: a worker process is started in steps (the fork server forks it, then it unpickles the
    pool's queues); Ctrl-C or SIGTERM between those steps left a worker the pool did not know of,
    which failed with a traceback on the user's terminal once this process had exited. Starting
    workers takes at most the fork server's start (its ``import torch``), so a stop waits that long.
    Signal handlers belong to the main thread: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(held):
            handler = before[signal.Signals(signum)]
            if callable(handler):
                handler(signum, None)   # raises Stopped or KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def disk_error(exc: OSError, path) -> MergeError:
    """ENOSPC / EFBIG / EDQUOT while writing ``path`` as one line naming the path and the fix."""
    return MergeError(f"{path}: {exc.strerror or exc} while writing; free space on that filesystem (or raise the "
                      "file-size limit, ulimit -f), or choose another output directory")


def run_cli(command: Callable[[], int | None]) -> int:
    """Run a command-line ``command`` and return its exit status; a ``MergeError`` becomes one
    ``error: ...`` line on stderr and status 2. Every command line of the project goes through this.

    SIGTERM and SIGINT stop the command with one line (status 143 / 130); OUT is not written, and
    the merge units already finished stay staged beside it for the same command to resume. SIGXFSZ is ignored so that a write past the
    file-size limit is an EFBIG error naming the file, not a silent kill.
    """
    signal.signal(signal.SIGTERM, _stop)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return int(command() or 0)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as exc:
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"error: stopped by {name}; the output was not written (rerun the same command to resume)",
              file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        print(f"error: {disk_error(exc, exc.filename or 'the output')}", file=sys.stderr)
        return 2
