"""Where units run: in this process, on N local worker processes, or on a Dask cluster.

Every executor takes the same unit functions and unit descriptions (paths and names, never
tensors) and yields results as units finish; the engine puts them back in plan order, so the
output does not depend on which executor ran what. Local workers are forked from a server process
that has imported the engine once (``forkserver``), so starting them costs no second ``import
torch`` per worker; each runs ``threads_per_worker`` torch threads so that N workers do not
oversubscribe the cores.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .errors import MergeError, signals_deferred


class WorkerLost(MergeError):
    """A worker died mid-merge: nothing was wrong with the inputs, and a rerun resumes."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ExecutorConfig:
    """``kind``: ``local`` (``n_workers`` processes; 1 = this process) or ``dask`` (``address`` of
    a running scheduler, or a ``LocalCluster`` of ``n_workers`` when None)."""

    kind: str = "local"
    n_workers: int | None = None          # local default: the number of cores
    address: str | None = None
    threads_per_worker: int | None = None  # default: cores / workers, at least 1

    def workers(self) -> int:
        return max(1, self.n_workers or available_cores())

    def threads(self) -> int:
        return self.threads_per_worker or max(1, available_cores() // self.workers())

    def describe(self) -> str:
        if self.kind == "dask":
            return f"dask {self.address or f'LocalCluster({self.workers()} workers)'}"
        return "this process" if self.workers() == 1 else f"{self.workers()} local processes"


@dataclass(frozen=True)
class WithThreads:
    """``fn`` run with ``threads`` torch threads, set in whichever thread runs it: OpenMP keeps the
    setting per thread, and a Dask worker runs units on threads of its own, where a setting made
    at its start does not apply (2 workers left at 2 threads each on 2 cores ran their arithmetic
    5x slower). Picklable: it travels to worker processes and Dask workers with each unit."""

    fn: Callable[[Any], Any]
    threads: int

    def __call__(self, unit: Any) -> Any:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.fn(unit)


def run_units(fn: Callable[[Any], Any], units: list, config: ExecutorConfig,
              on_done: Callable[[Any, Any], None] | None = None) -> list:
    """``[fn(u) for u in units]``, run by ``config``; ``on_done(unit, result)`` as each finishes (in
    this process). A unit's error is raised here, after the others still running have stopped."""
    results: dict[int, Any] = {}

    def done(i: int, result: Any) -> None:
        results[i] = result
        if on_done is not None:
            on_done(units[i], result)

    if not units:
        return []
    if config.kind == "dask":
        for i, r in _dask(fn, units, config):
            done(i, r)
    elif config.workers() == 1 or len(units) == 1:
        for i, u in enumerate(units):
            done(i, fn(u))
    else:
        for i, r in _processes(fn, units, config):
            done(i, r)
    return [results[i] for i in range(len(units))]


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["metamerge.units"])
    return ctx


def prestart(config: ExecutorConfig) -> None:
    """Start the fork server now (it imports torch and the engine in the background), so that it is
    ready when the first units are handed out instead of costing its import time then; the
    command line calls this before importing the engine itself."""
    if config.kind == "local" and config.workers() > 1:
        _start_forkserver()


def _start_forkserver() -> None:
    """Start the fork server (if it is not running) with Ctrl-C ignored, for it and its workers.

    Why: Ctrl-C in a terminal sends SIGINT to every process of the command, not only to this one.
    This process stops the merge (one line, status 130) and shuts its workers down; workers that
    took the KeyboardInterrupt themselves died mid-unit, and the pool's exit could then wait on a
    survivor for ever, and a fork server still importing torch printed a traceback. An ignored
    signal stays ignored across ``exec`` (Python leaves an inherited SIG_IGN for SIGINT alone), and
    the fork server hands its own setting on to the workers it forks. A Ctrl-C in the millisecond
    the server takes to spawn is lost (press it again). Off the main thread (a caller's task thread)
    the signal is not this code's to change: the server is started as it is.
    """
    import signal
    import threading
    from multiprocessing import forkserver

    _context()
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, before)


def _pool(workers: int) -> ProcessPoolExecutor:
    """One pool per worker count for the life of the process: a second merge in the same process
    (the pipeline, the tests) reuses warm workers."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = ProcessPoolExecutor(workers, mp_context=_context())
        _POOLS[workers] = pool
    return pool


def _processes(fn, units, config: ExecutorConfig) -> Iterator[tuple[int, Any]]:
    from concurrent.futures.process import BrokenProcessPool

    workers = min(config.workers(), len(units))
    _start_forkserver()  # (running already, unless this is the first pool or the server died)
    pool = _pool(workers)
    run = WithThreads(fn, config.threads())
    futures: dict = {}
    try:
        with signals_deferred():  # a stop never lands inside a worker's start
            for i, u in enumerate(units):
                futures[pool.submit(run, u)] = i
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=futures.__getitem__):
                yield futures[f], f.result()
    except BrokenProcessPool:
        _POOLS.pop(workers, None)
        raise WorkerLost("a merge worker process died (killed, or out of memory); rerun the same command to "
                         "resume from the finished units") from None
    except BaseException:
        # An error in a unit, a stop: the units not started are dropped, those running finish (so
        # that none writes into a staging directory the caller is about to remove or keep), and
        # the pool is retired. The pool cancels them itself (cancel_futures), in the thread that
        # also handles a worker's death: futures cancelled from here raced that thread, which then
        # failed with InvalidStateError and a traceback (workers killed with the process group).
        if _POOLS.get(workers) is pool:
            del _POOLS[workers]
        pool.shutdown(wait=True, cancel_futures=True)
        raise


def _dask(fn, units, config: ExecutorConfig) -> Iterator[tuple[int, Any]]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise MergeError("--dask needs the 'distributed' package: pip install 'distributed==2026.8.*'") from None
    cluster = None
    if config.address:
        client = Client(config.address, timeout="30s")
    else:
        cluster = LocalCluster(n_workers=config.workers(), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        # pure=False: every run is new work (a unit's result is a file it wrote, not a value);
        # a unit whose worker dies is run again elsewhere by the scheduler, with the same bytes
        futures = client.map(WithThreads(fn, config.threads_per_worker or 1), units, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for f in as_completed(futures):
            yield index[f.key], f.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
