"""The pipeline steps: plain functions (``tasks.steps``) and the Prefect tasks that wrap them.

``tasks.steps`` imports no Prefect, so the DVC stages (``python -m flows.stages``) run the very same
code without starting an orchestrator. Importing the package applies ``flows.settings`` first.
"""

from flows import settings  # noqa: F401  (side effect: environment defaults before Prefect loads)
