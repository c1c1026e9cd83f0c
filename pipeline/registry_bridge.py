"""The pipeline's calls into the registry layer (``modelregistry``, MLflow): nothing else here
talks to MLflow.

The registry is optional: without ``pipeline.registry`` in the params (or without the package)
registration is skipped with a reason, and the merge, its evaluation and reports stand alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from .params import Params, registry_config
from .store import Log, quiet

REGISTER_ENTRY_POINT = ("modelregistry", "register_merged")


def registry_entry_point() -> tuple[Callable | None, str]:
    """The registry's registration function, or None and why not (the module is optional)."""
    module, name = REGISTER_ENTRY_POINT
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return None, f"{module}.{name} is not available ({exc})"
    return fn, ""


def register(params: Params, info: dict, summary: dict, log: Log = quiet, *,
             lineage: dict | None = None, extra_artifacts: list[str] = ()) -> dict:
    """Register the merged model through ``modelregistry`` (MLflow; the promotion gate lives there).

    ``lineage`` (e.g. the Prefect flow run id, the DVC lock file) and ``extra_artifacts`` (the
    report files) go into the MLflow run beside the model.
    """
    config = registry_config(params.pipeline, params.source)
    if config is None:
        log("register: pipeline.registry is not set; skipped")
        return {"registered": False, "reason": "pipeline.registry is not set"}
    fn, why = registry_entry_point()
    if fn is None:
        log(f"register: {why}; skipped")
        return {"registered": False, "reason": why}
    log(f"register: {info['model_dir']} in '{config.model_name}' ({config.tracking_uri})")
    result = dict(fn(info["model_dir"], summary=summary, config=config, lineage=dict(lineage or {}),
                     extra_artifacts=[str(a) for a in extra_artifacts]))
    decision = result.get("decision") or {}
    if result.get("duplicate"):
        log(f"register: these weights are already version {result.get('version')}; nothing added")
    else:
        log(f"register: version {result.get('version')}: {decision.get('decision')} ({decision.get('reason', '')})")
    return {"registered": True, **result}


def log_study(tracking_uri: str, metrics: dict[str, float], files: list[str | Path]) -> str:
    """The demo study's table and plots as one MLflow run (experiment ``metamerge-study``); its id."""
    from modelregistry.runs import log_run

    return log_run(tracking_uri, "metamerge-study", "study", metrics, files)
