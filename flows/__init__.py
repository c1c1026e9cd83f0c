"""Prefect flows (``merge_flow``, ``watch_flow``) and the stage CLI that DVC runs (``flows.stages``).

Importing the package applies the quiet/offline defaults of ``flows.settings`` before Prefect loads.
"""

from . import settings  # noqa: F401  (side effect: environment defaults)
