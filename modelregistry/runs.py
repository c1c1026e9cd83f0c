"""Plain MLflow runs (no registered model): results that are not a merge, e.g. the demo study's table."""

from __future__ import annotations

from pathlib import Path

from .config import RegistryConfig, use_store


def log_run(tracking_uri: str, experiment: str, run_name: str, metrics: dict[str, float],
            files: list[str | Path]) -> str:
    """One run in ``experiment`` (created with the store's artifact location if new) holding
    ``metrics`` and ``files``; returns its id."""
    import mlflow

    config = RegistryConfig(tracking_uri=tracking_uri)
    with use_store(config):
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            location = config.artifact_location
            if location and "://" not in location:
                location = Path(location).absolute().as_uri()
            exp = mlflow.get_experiment(mlflow.create_experiment(experiment, artifact_location=location))
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name) as run:
            for key, value in metrics.items():
                mlflow.log_metric(key, value)
            for f in files:
                mlflow.log_artifact(str(f))
            return run.info.run_id
