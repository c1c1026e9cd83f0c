"""Load one tensor for computation: checked for NaN/Inf, cast, moved to the compute device."""

from __future__ import annotations

import torch

from .errors import MergeError
from .io import ModelReader

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def compute_dtype(cast_dtype: torch.dtype | None) -> torch.dtype:
    """Arithmetic runs in float32 at least, float64 when the recipe asks for it."""
    return torch.float64 if cast_dtype == torch.float64 else torch.float32


def load_compute(reader: ModelReader, name: str, device: torch.device, cast_dtype: torch.dtype | None,
                 rows: int | None = None) -> torch.Tensor:
    """The tensor as a fresh compute-dtype tensor on ``device``.

    ``cast_dtype`` (the recipe's ``dtype``) rounds the stored values first, as mergekit does when it
    loads; ``rows`` keeps only the first rows (shared vocabulary).
    """
    t = reader.get(name)
    if rows is not None:
        t = t[:rows]
    if cast_dtype is not None and t.dtype != cast_dtype:
        t = t.to(cast_dtype)
    out = t.to(device=device, dtype=compute_dtype(cast_dtype), copy=True)
    # A sum is NaN/Inf whenever an entry is (and costs a fraction of isfinite); only a
    # non-finite sum pays for the exact check, which also rules out a mere overflow of the sum.
    if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        bad = "NaN" if bool(torch.isnan(out).any()) else "Inf"
        raise MergeError(f"{reader.label}: tensor '{name}' in {reader.tensors[name].file} contains {bad}; "
                         "the checkpoint is damaged: re-download or re-train it")
    return out
