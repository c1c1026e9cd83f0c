"""The merge's units as Prefect tasks on ``prefect-dask``'s ``DaskTaskRunner``.

With ``pipeline.executor.kind: dask`` the merge task hands its units (norm units, then merge units:
small descriptions of paths and tensor names, see ``metamerge.units``) to a sub-flow whose task
runner is a ``DaskTaskRunner``: the cluster at ``executor.address``, else a ``LocalCluster``. Each
unit is one task run (``merge-unit-7``), visible in the UI, retried by Dask when its worker dies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task

from metamerge.executors import WithThreads
from pipeline.params import ExecutorParams


@task(name="unit", persist_result=False)
def unit(fn: Callable[[Any], Any], work: Any) -> Any:
    """One unit, wherever the task runner puts it; returns its small result (a record, norms)."""
    return fn(work)


@flow(name="metamerge-units", persist_result=False)
def units_flow(fn: Callable[[Any], Any], work: list, label: str) -> list:
    """Map ``fn`` over ``work`` as task runs named ``<label>-<n>``; results in unit order."""
    futures = [unit.with_options(task_run_name=f"{label}-{i}").submit(fn, w) for i, w in enumerate(work)]
    return [f.result() for f in futures]


def dask_task_runner(ex: ExecutorParams):
    from prefect_dask import DaskTaskRunner

    if ex.address:
        return DaskTaskRunner(address=ex.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": ex.n_workers or 2, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def prefect_runner(ex: ExecutorParams) -> Callable[..., list] | None:
    """The engine's ``runner`` for ``ex``: None for ``local`` (the engine's own worker processes)."""
    if ex.kind != "dask":
        return None

    def run(fn, work: list, on_done) -> list:
        label = "norm-unit" if fn.__name__ == "run_norm_unit" else "merge-unit"
        results = units_flow.with_options(task_runner=dask_task_runner(ex), flow_run_name=f"{label}s")(
            WithThreads(fn, ex.threads_per_worker or 1), work, label)
        for w, r in zip(work, results):
            on_done(w, r)
        return results

    return run
