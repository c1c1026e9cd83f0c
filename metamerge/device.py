"""Which torch device a run uses: one rule for every command that computes (merge, norms, scoring)."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an error.

    A ``torch.device`` is taken as is (after the same CUDA check), so callers that already hold
    one need not turn it back into a name.
    """
    if isinstance(name, torch.device):
        if name.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{name}': use cpu, cuda or auto")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
