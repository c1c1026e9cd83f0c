"""``merge``: the engine, fed with pinned inputs and cached norms."""

from __future__ import annotations

from prefect import task

from pipeline import keys, steps, store

from .common import keyed, load, log, progress_to_log
from .units import prefect_runner


def _merge_key(params: dict, pins: dict, sqnorms: dict | None = None) -> str:
    p = load(params)
    # the output location is part of what is cached (the result is a path to it)
    return keys.merge_key(p, pins) + "-" + keys.digest(str(store.merge_dir(p, pins)))[:8]


@task(name="merge", cache_key_fn=keyed(_merge_key), persist_result=True)
def merge(params: dict, pins: dict, sqnorms: dict | None = None) -> dict:
    """Write (or find) ``<output_root>/<name>-<key>``; returns its location, revision and lambdas.

    ``sqnorms`` are derived from the pinned inputs, so they are not part of the key.
    """
    p = load(params)
    with progress_to_log():
        return steps.merge(p, pins, sqnorms, log=log(), runner=prefect_runner(p.pipeline.executor))
