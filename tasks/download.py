"""``download``: pin a model reference (hub commit hash, or content hash of a local folder)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from . import steps
from .common import log


def retry_if_transient(task, task_run, state) -> bool:
    """Retry network and I/O errors only; a 404 or a bad revision fails at once."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and steps.is_transient(exc)


# Never cached: pinning is how a new hub revision or a changed folder is noticed at all.
@task(name="download", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.2, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def download(ref: str) -> dict:
    """The reference pinned: ``ResolvedModel.to_dict()`` (path, revision, source, file hashes)."""
    return steps.pin(ref, log=log())
