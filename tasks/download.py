"""``download``: pin a model reference (hub commit hash, or content hash of a local folder)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pipeline import steps

from .common import log, retry_if_transient


# Never cached: pinning is how a new hub revision or a changed folder is noticed at all.
@task(name="download", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.2, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def download(ref: str) -> dict:
    """The reference pinned: ``ResolvedModel.to_dict()`` (path, revision, source, file hashes)."""
    return steps.pin(ref, log=log())
