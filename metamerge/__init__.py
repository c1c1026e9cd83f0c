"""metamerge: the pure core of the merge pipeline.

Tensor math, streaming safetensors I/O, recipes and diagnostics. Nothing in this package imports
Prefect, MLflow or DVC: the pipeline (``tasks/``, ``flows/``) wraps it, and ``metamerge merge``
runs it alone.
"""

__version__ = "0.1.0"
