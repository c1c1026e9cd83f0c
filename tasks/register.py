"""``register``: the merged model into the MLflow registry, behind the promotion gate."""

from __future__ import annotations

from prefect import task

from pipeline import keys, registry_bridge
from pipeline.params import registry_config

from .common import ContentKey, limit_name, load, log, one_slot, retry_if_transient


def _register_key(params: dict, info: dict, summary: dict, artifacts: list[str] = ()) -> str:
    return keys.register_key(load(params), info, summary)


def gate_limit_name(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises registrations and gate decisions of one
    registered model (any flow, any deployment, any worker)."""
    return limit_name(f"gate-{model_name}")


@task(name="register", cache_policy=ContentKey(make_key=_register_key), persist_result=True,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def register(params: dict, info: dict, summary: dict, artifacts: list[str] = ()) -> dict:
    """A new registered version (once per merged model, summary and registry), then the gate, one
    registered model at a time."""
    from prefect.runtime import flow_run

    p = load(params)

    def call() -> dict:
        return registry_bridge.register(p, info, summary, log=log(), lineage={"prefect_flow_run_id": flow_run.id},
                                        extra_artifacts=artifacts)

    try:
        config = registry_config(p.pipeline, p.source)
    except ImportError:  # no registry package: the bridge says why and skips
        config = None
    if config is None:
        return call()
    with one_slot(gate_limit_name(config.model_name)):
        return call()
