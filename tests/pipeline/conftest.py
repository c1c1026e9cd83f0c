"""Pipeline tests: tiny models built once, and one ephemeral Prefect server for the whole session.

The quiet/offline environment is set here, before anything imports Prefect, with PREFECT_HOME in a
temporary directory so the tests never touch a user's profile, database or result storage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline_helpers import build_models

_HOME = Path(tempfile.mkdtemp(prefix="metamerge-prefect-home-"))
os.environ.update({
    "PREFECT_HOME": str(_HOME),
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("PREFECT_API_URL", None)  # never a server the developer's environment points at


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect server (real API, temporary database) for every flow test; its API URL."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()  # for subprocesses that should use the same server


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)
