"""Check ``prefect.yaml``'s deployments before deploying them: each one's params file validates and
every input it names is there, or one line says which deployment fails and what to do.

    python -m flows.deployments [prefect.yaml]      (``make deploy`` runs it before ``prefect deploy``)

Why: a deployment whose inputs are missing is accepted by ``prefect deploy`` and then fails on every
scheduled run (the shipped ones read ``params/demo.yaml``, whose models and eval sets exist only
after ``make demo``). Checking here refuses it before any run is scheduled. No Prefect server is
contacted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

import pipeline_env  # noqa: F401  (environment defaults before anything loads)
from metamerge.errors import InputError, run_cli
from pipeline import steps
from pipeline.params import load_params


def check_deployments(path: str | Path = "prefect.yaml") -> list[str]:
    """One line per deployment that is ready; raises ``InputError`` naming the first that is not."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror}); run from the project root") from None
    ready = []
    for d in config.get("deployments") or []:
        name, params_file = d.get("name", "?"), (d.get("parameters") or {}).get("recipe")
        if not isinstance(params_file, str):
            raise InputError(f"{path}: deployment '{name}': parameters.recipe must name a params file")
        try:
            steps.check_inputs(load_params(params_file))
        except InputError as exc:
            fix = " (build the demo's models and eval sets first: make demo)" if "demo" in params_file else ""
            raise InputError(f"{path}: deployment '{name}' would fail on every run: {exc}{fix}") from None
        ready.append(f"{name}: {params_file} ready")
    return ready


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run_cli(lambda: print("\n".join(check_deployments(*(args[:1] or ["prefect.yaml"])))))


if __name__ == "__main__":
    sys.exit(main())
