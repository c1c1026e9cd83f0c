"""Where the registry lives and how the promotion gate decides: one pydantic object, ``RegistryConfig``.

Defaults
    ``tracking_uri``       ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlruns.db`` (MLflow 3
                           refuses the old ``./mlruns`` file store; a SQLite file needs no server).
    ``artifact_location``  for a local SQLite store, ``<directory of the db>/mlartifacts``; for a
                           tracking server, ``None`` (the server's own artifact root is used).
    ``experiment_name``    ``metamerge``;  ``model_name`` (the registered model): ``metamerge-merged``.
    ``register_by_reference``  ``False``: the merged directory is copied into the artifact store.
                           ``True`` (very large models): only a small JSON pointer (the directory's
                           absolute path and the sha256 of every file) is logged; the weights stay
                           where they are, loading the registered model reads them from that path
                           and ``audit`` verifies them there. Use it only where that path is durable
                           and reachable from wherever the model is loaded.

The promotion gate (see ``promotion.py``): a new version becomes ``champion`` when its ``metric``
(default ``mean_normalized_score``) is finite and strictly better than the best of the best score
ever promoted and the base model's own score, minus ``tolerance`` (default 0; plus when
``greater_is_better`` is false, e.g. for ``ald``), and no task's normalized score is non-finite or
below ``floor`` (default 0). A tie does not promote.

Telemetry is off and MLflow's progress bars too: importing this module applies ``pipeline_env``
(the one module of environment defaults) before MLflow is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

import pipeline_env  # noqa: F401  (side effect: telemetry and progress bars off before MLflow loads)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().absolute() / 'mlruns.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or ``None`` for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest if rest.startswith("/") else Path.cwd() / rest).absolute()


class RegistryConfig(BaseModel):
    """Tracking store, experiment, registered model and promotion-gate settings."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(default_factory=default_tracking_uri)
    artifact_location: str | None = None
    experiment_name: str = "metamerge"
    model_name: str = "metamerge-merged"
    register_by_reference: bool = False
    # promotion gate
    metric: str = "mean_normalized_score"
    greater_is_better: bool = True
    tolerance: float = Field(default=0.0, ge=0.0)
    floor: float = 0.0
    # generation defaults of the registered pyfunc model (overridable per predict call)
    max_new_tokens: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _locations(self) -> RegistryConfig:
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            # normalise a relative sqlite path so every process sees the same database
            self.tracking_uri = f"sqlite:///{db}"
            if self.artifact_location is None:
                self.artifact_location = str(db.parent / "mlartifacts")
        if self.artifact_location and "://" not in self.artifact_location:
            self.artifact_location = str(Path(self.artifact_location).expanduser().absolute())
        return self

    def prepare(self) -> None:
        """Create the local directories a SQLite store and a local artifact root need."""
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        if self.artifact_location and "://" not in self.artifact_location:
            Path(self.artifact_location).mkdir(parents=True, exist_ok=True)

    def client(self):
        """An ``MlflowClient`` bound to this store (tracking and registry)."""
        from mlflow import MlflowClient

        self.prepare()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


class use_store:
    """Context manager: point MLflow's fluent API (runs, log_model, downloads) at ``config``'s store
    and restore the previous tracking and registry URIs afterwards."""

    def __init__(self, config: RegistryConfig):
        self.config = config

    def __enter__(self):
        import mlflow
        from mlflow.tracking._model_registry import utils as reg_utils
        from mlflow.tracking._tracking_service import utils as track_utils

        self.config.prepare()
        # set_tracking_uri also exports MLFLOW_TRACKING_URI: remember the environment too
        self._old = (getattr(track_utils, "_tracking_uri", None), getattr(reg_utils, "_registry_uri", None),
                     {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
        mlflow.set_tracking_uri(self.config.tracking_uri)
        mlflow.set_registry_uri(self.config.tracking_uri)
        return self.config

    def __exit__(self, *exc):
        import mlflow

        tracking, registry, env = self._old
        mlflow.set_tracking_uri(tracking)
        from mlflow.tracking._model_registry import utils as reg_utils

        reg_utils._registry_uri = registry
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return False
