"""The optional bridge to EleutherAI's lm-evaluation-harness: standard benchmarks on a merged model.

Not a dependency of this project: the harness is imported only when a benchmark is asked for, and
the user installs it (and makes its datasets reachable).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from metamerge.device import resolve_device

from .evalsets import PathLike


def run_lm_eval(
    model_dir: PathLike,
    tasks: Iterable[str],
    *,
    device: str = "auto",
    batch_size: int | str = 16,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
) -> dict[str, Any]:
    """Run standard benchmarks with lm-evaluation-harness's HF backend, if the user installed it.

    Not a dependency of this project: imported lazily. Returns the harness's ``results`` dict
    (``{task: {metric: value}}``).
    """
    try:
        import lm_eval
    except ImportError:
        raise ImportError("run_lm_eval needs EleutherAI's lm-evaluation-harness: pip install lm-eval") from None
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={os.fspath(model_dir)},dtype=float32,trust_remote_code=False",
        tasks=list(tasks),
        device=str(resolve_device(device)),
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        limit=limit,
    )
    return dict(out["results"]) if out else {}
