"""Where the steps' outputs (folders) live, named by their content keys (``keys``)::

    <output_root>/<name>-<merge key>/          the merged model (engine output, with provenance)
    <output_root>/reports/<name>-<merge key>/  merge.json, lambdas.csv/png, eval.json/csv, metrics.json
    <output_root>/task_vectors/<key>/          tau_t as safetensors (only if materialize_task_vectors)

These are outputs, not a cache: the steps themselves keep no record of past results. Prefect's
cache (the flows) and DVC's (the stages) decide what reruns; a step asked to write a folder that
already holds its complete output (same key, same provenance) reuses it in place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metamerge.atomic import write_text_atomic

from .keys import merge_key, task_vector_key
from .params import Params

Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "merge"


def merge_dir(params: Params, pins: dict[str, dict]) -> Path:
    """Where the flow writes this merge: ``<output_root>/<name>-<short key>``."""
    return params.output_root / f"{_slug(params.name)}-{merge_key(params, pins).removeprefix('merge-')[:12]}"


def report_dir(params: Params, model_dir: str | Path) -> Path:
    return params.output_root / "reports" / Path(model_dir).name


def task_vector_dir(params: Params, pins: dict[str, dict], ref: str) -> Path:
    return params.output_root / "task_vectors" / task_vector_key(params, pins, ref).removeprefix("tv-")[:16]


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> Path:
    """Strict JSON (no NaN), atomically: a reader never sees half a result."""
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")
