"""``merge``: the engine, fed with pinned inputs and cached norms."""

from __future__ import annotations

from prefect import task

from pipeline import keys, steps, store

from .common import ContentKey, load, log, progress_to_log
from .units import prefect_runner


def _merge_key(params: dict, pins: dict, sqnorms: dict | None = None) -> str:
    # sqnorms are derived from the pinned inputs, so they are not part of the key
    return keys.merge_key(load(params), pins)


def _merged_output(params: dict, pins: dict, sqnorms: dict | None = None) -> tuple[str, bool]:
    p = load(params)
    out = store.merge_dir(p, pins)
    return str(out), steps.existing_merge(p, pins, out) is not None


@task(name="merge", cache_policy=ContentKey(make_key=_merge_key, output=_merged_output, field="model_dir"),
      persist_result=True)
def merge(params: dict, pins: dict, sqnorms: dict | None = None) -> dict:
    """Write (or find) ``<output_root>/<name>-<key>``; returns its location, revision and lambdas."""
    p = load(params)
    with progress_to_log():
        return steps.merge(p, pins, sqnorms, log=log(), runner=prefect_runner(p.pipeline.executor))
