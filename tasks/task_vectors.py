"""``extract_task_vectors`` and ``compute_norms``: the per-fine-tune work, cached per fine-tune."""

from __future__ import annotations

from prefect import task

from pipeline import keys, steps, store

from .common import keyed, load, log


def _tv_key(params: dict, pins: dict, ref: str) -> str:
    p = load(params)
    where = str(store.task_vector_dir(p, pins, ref)) if p.pipeline.materialize_task_vectors else None
    return keys.task_vector_key(p, pins, ref) + "-" + keys.digest(where)[:8]


@task(name="extract_task_vectors", cache_key_fn=keyed(_tv_key), persist_result=True)
def extract_task_vectors(params: dict, pins: dict, ref: str) -> dict:
    """tau_t = theta_t - theta_0, streamed (default) or written once as safetensors."""
    return steps.task_vectors(load(params), pins, ref, log=log())


def _norms_key(params: dict, pins: dict, ref: str) -> str:
    p = load(params)
    return keys.norms_key(p, pins, ref, keys.device_type(p))


@task(name="compute_norms", cache_key_fn=keyed(_norms_key), persist_result=True)
def compute_norms(params: dict, pins: dict, ref: str) -> dict[str, float]:
    """||tau_t||^2 per tensor, keyed by (base revision, fine-tune revision, what the method's
    statistic depends on, code): when a new fine-tune lands, only its norms are computed."""
    return steps.norms(load(params), pins, ref, log=log())
