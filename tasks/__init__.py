"""Prefect tasks: thin wrappers over the plain step functions of ``pipeline``.

Each task calls one pipeline function and declares, where it is defined, what Prefect adds: its
retries, its cache policy (``common.ContentKey`` over the step's content key, ``pipeline.keys``),
its concurrency.
Importing the package applies ``pipeline_env``'s defaults before Prefect loads.
"""

import pipeline_env  # noqa: F401  (side effect: environment defaults before Prefect loads)
