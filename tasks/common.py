"""What every Prefect task shares: the run logger, params re-validation, the content cache policy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

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


@dataclass
class ContentKey(CachePolicy):
    """A Prefect cache policy: the step's content key (``pipeline.keys``), from the task's own
    parameters; never a path or a time, so the same inputs hit the cache from any process and any
    output root that share the result storage, and any changed input misses.

    A step whose result names an output folder also gives ``output``: (where this run's output
    belongs, whether it is there and complete), or None when it writes none. A recorded result is
    served only when that output is complete and is the one the record names (``field``);
    otherwise, when there is a record, the policy returns no key: the task runs with no cache
    lookup, so a deleted or half-written output is rebuilt (the step reuses a complete one in
    place) and a result naming another output root's copy is never handed out. The record stays
    as it was, and names the rebuilt folder again, so the next run is served from the cache. With
    no record yet the key is returned as is: a miss, and the run records its result. (One record
    per key: a second output root holding the same content is not served from it; its task runs
    each time and finds its complete folder in place, in the time it takes to read provenance.)
    """

    make_key: Callable[..., str] | None = None
    output: Callable[..., tuple[str, bool] | None] | None = None
    field: str = "path"

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        assert self.make_key is not None
        key = self.make_key(**inputs)
        where = self.output(**inputs) if self.output is not None else None
        if where is None:
            return key
        path, complete = where
        store = task_ctx.result_store
        if not store.exists(key):
            return key  # a miss: the task runs and its result is recorded
        if complete and store.read(key).result.get(self.field) == path:
            return key  # a hit
        return None


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
