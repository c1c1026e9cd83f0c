"""``extract_task_vectors`` and ``compute_norms``: the per-fine-tune work, cached per fine-tune."""

from __future__ import annotations

from prefect import task

from pipeline import keys, steps, store

from .common import ContentKey, load, log, progress_to_log


def _tv_key(params: dict, pins: dict, ref: str) -> str:
    return keys.task_vectors_step_key(load(params), pins, ref)


def _tv_output(params: dict, pins: dict, ref: str) -> tuple[str, bool] | None:
    p = load(params)
    if not p.pipeline.materialize_task_vectors:
        return None  # streamed: nothing on disk to check
    out = store.task_vector_dir(p, pins, ref)
    return str(out), steps.task_vector_done(p, pins, ref)


@task(name="extract_task_vectors", cache_policy=ContentKey(make_key=_tv_key, output=_tv_output, field="path"),
      persist_result=True)
def extract_task_vectors(params: dict, pins: dict, ref: str) -> dict:
    """tau_t = theta_t - theta_0, streamed (default) or written once as safetensors."""
    return steps.task_vectors(load(params), pins, ref, log=log())


def _norms_key(params: dict, pins: dict, ref: str) -> str:
    p = load(params)
    return keys.norms_key(p, pins, ref, keys.device_type(p))


@task(name="compute_norms", cache_policy=ContentKey(make_key=_norms_key), persist_result=True)
def compute_norms(params: dict, pins: dict, ref: str) -> dict[str, float]:
    """||tau_t||^2 per tensor, keyed by (base revision, fine-tune revision, what the method's
    statistic depends on, code): when a new fine-tune lands, only its norms are computed. The norm
    pass reports its progress to the task run's log, a line per tenth."""
    with progress_to_log():
        return steps.norms(load(params), pins, ref, log=log())
