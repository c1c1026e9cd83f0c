"""Content keys: what each step's result depends on, hashed; one definition per step.

A key is made of revisions, file hashes, the recipe, the settings the step reads and the code's
version, never of paths or times: the same inputs find the same result from any process and any
output root, and a changed input is never served stale. The Prefect tasks' cache policy
(``tasks.common.ContentKey``) uses these keys; the content-addressed output folders (``store``) are
named by them.
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

# Code a result's bytes can depend on, by kind, as git pathspecs (``*.py`` only: never a __pycache__).
# The core counts whole but for what only reads or reports (a new engine module is then covered
# without anyone remembering to list it); the steps module counts for both, since it decides how
# the core is called.
_EVALUATE = ("evaluation/evalsets.py", "evaluation/scoring.py", "evaluation/summary.py", "metamerge/greedy.py")
_CODE = {
    "engine": (":(glob)metamerge/**/*.py", ":(exclude)metamerge/cli.py", ":(exclude)metamerge/greedy.py"),
    "evaluate": _EVALUATE,
    "linearity": (*_EVALUATE, "evaluation/study.py"),  # the demo study's linearity check
}
_STEPS = "pipeline/steps.py"


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_version(kind: str) -> str:
    """The version of the code a step's result depends on: ``engine``, ``evaluate`` or ``linearity``.

    In a git checkout, git's object ids of those files as they are in the working tree (the
    committed blob, or for an uncommitted edit or a new file the id ``git hash-object`` gives it):
    an edit invalidates exactly the results it could change, committing it changes nothing more,
    and reverting it brings the old results back. Outside git (an installed package), the
    package's version. Either way with torch's. Once per process: code does not change under a
    running process.
    """
    import importlib.metadata

    import torch

    if kind not in _CODE:
        raise ValueError(kind)
    blobs = git_blobs(PROJECT_ROOT, (*_CODE[kind], _STEPS))
    code: Any = blobs if blobs else {"metamerge": importlib.metadata.version("metamerge")}
    return digest({"code": code, "torch": torch.__version__.split("+")[0]})[:16]


def git_blobs(root: Path, pathspecs: tuple[str, ...]) -> dict[str, str] | None:
    """``{path: git object id}`` of the files under ``root`` that ``pathspecs`` match, tracked or not
    (but not ignored), as they are on disk now; None when ``root`` is not a git checkout of them."""
    import subprocess

    def git(*args: str, stdin: str | None = None) -> list[str]:
        cmd = ["git", "-C", str(root), *args] + (["--", *pathspecs] if stdin is None else [])
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()

    try:
        # the index's ids (the commit's, or what was staged), then what differs on disk or is new
        blobs = {line.split("\t", 1)[1]: line.split()[1] for line in git("ls-files", "--stage")}
        changed = git("diff", "--name-only", "--relative", "--no-renames") + \
            git("ls-files", "--others", "--exclude-standard")
        present = [p for p in dict.fromkeys(changed) if (root / p).is_file()]
        for p in set(changed) - set(present):
            blobs.pop(p, None)  # deleted on disk
        if present:
            blobs.update(zip(present, git("hash-object", "--stdin-paths", stdin="\n".join(present) + "\n")))
    except (OSError, subprocess.CalledProcessError):  # no git, or not a repository
        return None
    return blobs or None


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


def task_vectors_step_key(params: Params, pins: dict[str, dict], ref: str) -> str:
    """The extract_task_vectors step: tau_t's key, and whether it is written (a streamed tau_t has
    no files, a materialised one names them)."""
    return task_vector_key(params, pins, ref) + ("-written" if params.pipeline.materialize_task_vectors else "-streamed")


def pinned_revision(pin: dict) -> str:
    """What pins one input: its revision, and for ``BASE+ADAPTER`` its own base's revision too (a
    bare adapter folder is applied to the recipe's base, whose revision every key has already)."""
    base = pin.get("base_revision")
    return f"{base}+{pin['revision']}" if base else pin["revision"]


def eval_key(params: Params, revision: str, device: str | None = None) -> str:
    """A model's scores: its content, the eval sets' content, the settings, the device, the code."""
    return "eval-" + digest({"model": revision, "sets": eval_set_hashes(params),
                             "settings": params.pipeline.eval.model_dump(exclude={"lm_eval"}),
                             "device": device or device_type(params), "code": code_version("evaluate")})


def eval_set_hashes(params: Params) -> dict[str, str]:
    """``{task: sha256}`` of the eval sets: the content every score depends on."""
    return {t: sha256_file(Path(p)) for t, p in params.pipeline.eval_sets.items()}


def benchmark_key(params: Params, revision: str) -> str:
    """What a benchmark result depends on: the model's content, the harness settings, the device."""
    cfg = params.pipeline.eval.lm_eval
    return "lm-eval-" + digest({"model": revision, "settings": cfg.model_dump() if cfg else None,
                                "device": device_type(params)})


def report_key(params: Params, info: dict, scores: dict, benchmarks: dict | None = None) -> str:
    """The report files: the merged model's content, the scores and benchmarks they show, the
    experts the summary compares against, the code that summarises."""
    return "report-" + digest({"merge": info["revision"], "scores": scores, "lm_eval": benchmarks or {},
                               "experts": params.pipeline.experts, "code": code_version("evaluate")})


def register_key(params: Params, info: dict, summary: dict) -> str:
    """A registration: the merged model's content, the registry settings, the summary it records,
    the code, and whether the registry module is there at all (a skipped registration is redone
    once it is)."""
    from .registry_bridge import registry_entry_point

    return "register-" + digest({"merge": info["revision"], "registry": params.pipeline.registry,
                                 "summary": summary, "available": registry_entry_point()[0] is not None,
                                 "code": code_version("evaluate")})
