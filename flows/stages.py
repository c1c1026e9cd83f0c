"""The command DVC runs for each stage (``dvc.yaml``): ``python -m flows.stages STAGE PARAMS.yaml``.

The stages are the pipeline's plain step functions (``pipeline.stages``), the very ones the Prefect
tasks wrap: one code path, and no orchestrator started inside a DVC stage.
"""

from __future__ import annotations

import sys

from pipeline.stages import STAGES, main, run_stage

__all__ = ["STAGES", "main", "run_stage"]

if __name__ == "__main__":
    sys.exit(main())
