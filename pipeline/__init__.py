"""The pipeline's steps as plain functions: what the Prefect tasks (``tasks/``) and the DVC stages
(``flows/stages.py``) both run. No Prefect here, so a DVC stage never starts an orchestrator.

    params            the params file (recipe + pipeline settings), validated before any work
    keys              content keys: digests, code versions, what each result depends on
    store             where results live under their keys; read-or-compute-and-store
    steps             download/pin, task vectors, norms, merge, evaluate, benchmark
    reports           the files DVC and the UI show (metrics, CSV, plots, markdown)
    registry_bridge   registration and the study's run, through ``modelregistry``
    retry             which failures are worth retrying
    watch             what a watch list adds to a merge
    stages            the DVC stages (``python -m flows.stages``)
    study             the demo study's pieces: scenario, linearity check, report

Importing the package applies the environment defaults of ``pipeline_env`` first.
"""

import pipeline_env  # noqa: F401  (side effect: environment defaults before any tool loads)
