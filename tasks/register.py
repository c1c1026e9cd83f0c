"""``register``: the merged model into the MLflow registry, behind the promotion gate."""

from __future__ import annotations

from prefect import task

from pipeline import keys, registry_bridge

from .common import keyed, load, log, retry_if_transient


def _register_key(params: dict, info: dict, summary: dict, artifacts: list[str] = ()) -> str:
    p = load(params)
    # whether the registry module is there yet is part of the key: a skipped registration is redone
    available = registry_bridge.registry_entry_point()[0] is not None
    return "register-" + keys.digest({"merge": info["revision"], "registry": p.pipeline.registry,
                                      "summary": summary, "available": available,
                                      "code": keys.code_version("evaluate")})


@task(name="register", cache_key_fn=keyed(_register_key), persist_result=True,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def register(params: dict, info: dict, summary: dict, artifacts: list[str] = ()) -> dict:
    """A new registered version (once per merged model, summary and registry), then the gate."""
    from prefect.runtime import flow_run

    return registry_bridge.register(load(params), info, summary, log=log(),
                                    lineage={"prefect_flow_run_id": flow_run.id}, extra_artifacts=artifacts)
