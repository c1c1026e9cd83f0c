"""Environment defaults of every process above the core: quiet, telemetry off, one place.

The pipeline (``pipeline``, ``tasks``, ``flows``) and the registry (``modelregistry``) import this
module first, so the defaults are set before Prefect, MLflow, DVC or the hub client read them. Each
value is a default (``os.environ.setdefault``): anything the user exported wins. Nothing here turns
the hub off (``HF_HUB_OFFLINE``) or moves ``PREFECT_HOME``: the pipeline downloads models and may
run against a user's own Prefect profile; the demo and the tests set those themselves.

The merge core (``metamerge``) does not import this module: it talks to none of these tools.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "DO_NOT_TRACK": "true",                      # MLflow and others; MLflow wants "true", not 1
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no download bars in logs
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else the ephemeral server logs a failed call home
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # first start with a new database: ~20 s
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",         # hub downloads and transformers' "Loading weights":
                                                 # bars are noise in worker logs and DVC stage output
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply() -> None:
    """Set every default the environment does not already set."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


apply()
