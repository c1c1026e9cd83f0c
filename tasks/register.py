"""``register``: the merged model into the MLflow registry, behind the promotion gate."""

from __future__ import annotations

from prefect import task

from . import steps
from .common import keyed, load, log
from .download import retry_if_transient


def _register_key(params: dict, info: dict, summary: dict, artifacts: list[str] = ()) -> str:
    p = load(params)
    # whether the registry module is there yet is part of the key: a skipped registration is redone
    available = steps.registry_entry_point()[0] is not None
    return "register-" + steps.digest({"merge": info["revision"], "registry": p.pipeline.registry,
                                       "summary": summary, "available": available,
                                       "code": steps.code_version("evaluate")})


@task(name="register", cache_key_fn=keyed(_register_key), persist_result=True,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def register(params: dict, info: dict, summary: dict, artifacts: list[str] = ()) -> dict:
    """A new registered version (once per merged model, summary and registry), then the gate."""
    from prefect.runtime import flow_run

    return steps.register(load(params), info, summary, log=log(), lineage={"prefect_flow_run_id": flow_run.id},
                          extra_artifacts=artifacts)
