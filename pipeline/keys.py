"""Content keys: what each stored result depends on, hashed.

A key is made of revisions, file hashes, the recipe, the settings that change the bytes and the
code, never of paths or times: the same inputs find the same result from any process, and a
changed input is never served stale. The Prefect tasks use these keys for their cache too.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from metamerge.refs import sha256_file

from .params import Params

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The code a result's bytes can depend on, by kind. The core counts whole but for what only reads or
# reports (a new engine module is then covered without anyone remembering to list it); the steps
# module counts for both, since it decides how the core is called.
_NOT_ENGINE = ("metamerge/cli.py", "metamerge/greedy.py")
_EVALUATE = ("evaluation/evalsets.py", "evaluation/scoring.py", "evaluation/summary.py", "metamerge/greedy.py")
_STEPS = "pipeline/steps.py"


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_version(kind: str) -> str:
    """A content hash of the code a step's result depends on: ``engine`` or ``evaluate``.

    Editing that code invalidates exactly the results it could change.
    """
    import torch

    import metamerge

    if kind == "engine":
        files = [p.relative_to(PROJECT_ROOT).as_posix() for p in sorted((PROJECT_ROOT / "metamerge").rglob("*.py"))]
        files = [f for f in files if f not in _NOT_ENGINE]
    elif kind == "evaluate":
        files = list(_EVALUATE)
    else:
        raise ValueError(kind)
    h = hashlib.sha256(f"{metamerge.__version__}\0torch {torch.__version__.split('+')[0]}\0".encode())
    for name in files + [_STEPS]:
        h.update(name.encode() + b"\0" + (PROJECT_ROOT / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# What a recipe reads: its method, its inputs
# --------------------------------------------------------------------------------------------------


def method_class(params: Params):
    from metamerge.methods import get_method

    return get_method(params.recipe.merge_method)


def method(params: Params):
    """The recipe's merge method, configured by the recipe (what it needs, what its statistic is keyed by)."""
    return method_class(params)(params.recipe)


def needs_norms(params: Params) -> bool:
    """Whether the method needs a whole-model statistic of each fine-tune before merging (MetaGPT at
    granularity model: the squared task-vector norms), which the pipeline caches per fine-tune."""
    return method(params).needs_model_statistics()


def fine_tunes(params: Params) -> list[str]:
    """The references that contribute a task vector (or, without a base, every merged model)."""
    cls = method_class(params)
    entries = params.recipe.fine_tunes() if cls.uses_base(params.recipe) else params.recipe.models
    return [e.model for e in entries]


def merged_refs(params: Params) -> list[str]:
    """Every model the merge combines: the base (if the method uses one), then the fine-tunes."""
    return ([params.recipe.base_model] if method_class(params).uses_base(params.recipe) else []) + fine_tunes(params)


def input_refs(params: Params) -> list[str]:
    """Every reference the merge reads, base first, each once."""
    refs = merged_refs(params)
    if params.recipe.tokenizer_source not in (None, "base", "union"):
        refs.append(params.recipe.tokenizer_source)
    return list(dict.fromkeys(refs))


def device_type(params: Params) -> str:
    from metamerge.device import resolve_device

    return resolve_device(params.pipeline.device).type


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def norms_key(params: Params, pins: dict[str, dict], ref: str, device: str) -> str:
    """One fine-tune's whole-model statistic: (base revision, fine-tune revision, what the method
    says the statistic depends on (``statistics_key``: its name, parameters, dtype, seed key...),
    device, code). The pipeline knows no method by name."""
    r = params.recipe
    m = method(params)
    index = next(i for i, e in enumerate(m.entries) if e.model == ref)
    return "norms-" + digest({
        "base": pins[r.base_model]["revision"], "model": pinned_revision(pins[ref]),
        **m.statistics_key(index), "device": device, "code": code_version("engine"),
    })


def merge_key(params: Params, pins: dict[str, dict], device: str | None = None) -> str:
    """The recipe, every input's pinned revision, the code and what changes output bytes."""
    what = {
        "recipe": params.recipe.sha256(),
        "inputs": {ref: pinned_revision(pins[ref]) for ref in input_refs(params)},
        "device": device or device_type(params), "max_shard_size": params.pipeline.max_shard_size,
        "code": code_version("engine"),
    }
    if params.pipeline.output == "adapter":  # (a full model's key is unchanged by this option)
        what["output"] = {"kind": "adapter", "rank": params.pipeline.adapter_rank}
    return "merge-" + digest(what)


def task_vector_key(params: Params, pins: dict[str, dict], ref: str) -> str:
    """tau_t depends on the base and fine-tune revisions, the recipe's dtype and the code only."""
    return "tv-" + digest({"base": pins[params.recipe.base_model]["revision"], "model": pinned_revision(pins[ref]),
                           "dtype": params.recipe.dtype, "code": code_version("engine")})


def pinned_revision(pin: dict) -> str:
    """What pins one input: its revision, and for ``BASE+ADAPTER`` its own base's revision too (a
    bare adapter folder is applied to the recipe's base, whose revision every key has already)."""
    base = pin.get("base_revision")
    return f"{base}+{pin['revision']}" if base else pin["revision"]


def eval_key(params: Params, revision: str, device: str | None = None) -> str:
    """A model's scores: its content, the eval sets' content, the settings, the device, the code."""
    sets = {t: sha256_file(Path(p)) for t, p in params.pipeline.eval_sets.items()}
    return "eval-" + digest({"model": revision, "sets": sets,
                             "settings": params.pipeline.eval.model_dump(exclude={"lm_eval"}),
                             "device": device or device_type(params), "code": code_version("evaluate")})


def benchmark_key(params: Params, revision: str) -> str:
    """What a benchmark result depends on: the model's content, the harness settings, the device."""
    cfg = params.pipeline.eval.lm_eval
    return "lm-eval-" + digest({"model": revision, "settings": cfg.model_dump() if cfg else None,
                                "device": device_type(params)})
