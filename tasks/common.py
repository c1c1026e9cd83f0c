"""What every Prefect task shares: the run logger, params re-validation, content cache keys."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prefect import get_run_logger

from pipeline.params import Params, load_params


def log() -> Callable[[str], None]:
    """Progress lines go to the task run's logger (the UI, and the console in ephemeral mode)."""
    return get_run_logger().info


@contextlib.contextmanager
def progress_to_log() -> Iterator[None]:
    """While a task works, the core's progress (merge, norm pass, evaluation batches, training)
    reaches the task run's log as one line per tenth of each pass (``metamerge.progress``):
    visible in the UI and the worker's output, never as a terminal bar."""
    from metamerge.progress import report_to

    with report_to(get_run_logger().info):
        yield


def load(params: dict[str, Any] | Params) -> Params:
    """Tasks take params as a plain mapping (cheap to hand around, nothing to serialise) and
    re-validate it: a task never runs on a recipe that did not pass validation."""
    return load_params(params)


def keyed(make_key: Callable[..., str]) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` from a function of the task's own parameters.

    The key is the content the result depends on (never a path or a time), so the same inputs hit
    the cache from any process that shares the result storage, and any changed input misses.
    """
    def cache_key(_context, parameters: dict[str, Any]) -> str:
        return make_key(**parameters)

    cache_key.__name__ = f"key_of_{make_key.__name__}"
    return cache_key


def retry_if_transient(task, task_run, state) -> bool:
    """A Prefect ``retry_condition_fn``: retry network and I/O errors only (``pipeline.retry``);
    a 404 or a bad revision fails at once."""
    from pipeline import retry

    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and retry.is_transient(exc)


@contextlib.contextmanager
def one_slot(name: str) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit ``name`` (created with limit 1 on
    first use; ``prefect gcl update NAME --limit N`` allows more): runs that share it take turns,
    across processes and machines that talk to one Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    with concurrency(name, occupy=1, strict=True):
        yield


def limit_name(text: str) -> str:
    """A concurrency-limit (or artifact) key from any text: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in f"metamerge-{text}".lower()).strip("-")[:80]
