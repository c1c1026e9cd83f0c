"""Prefect flows: they compose the tasks of ``tasks/`` and hold no logic of their own.

``merge_flow`` (one merge: pin, norms, merge, evaluate, report, register), ``watch_flow`` (merge
again when an input changed), ``study`` (the demo's comparison of every method), ``demo`` (``make
demo``), and ``stages``, the command DVC runs (plain ``pipeline`` functions, no Prefect).

Importing the package applies the quiet/offline defaults of ``pipeline_env`` before Prefect loads.
"""

import pipeline_env  # noqa: F401  (side effect: environment defaults)
