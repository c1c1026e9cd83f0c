"""The finalize step's files beside the weights: the report, config, tokenizer, recipe, model card
and provenance (what went in, what came out, with hashes), written into the staging directory
before it is renamed into OUT. ``--as-adapter`` writes the same files for its adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .diagnostics import Diagnostics
from .io.untrusted import own_file
from .modelcard import render_model_card
from .recipe import Recipe
from .refs import sha256_file
from .report import REPORT_FILE, MergeReport

if TYPE_CHECKING:
    from .engine import Inputs

TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json",
                   "chat_template*")
REPORT = REPORT_FILE
PROVENANCE = "provenance.json"
RECIPE_FILE = "merge_recipe.yaml"


def report_of(recipe: Recipe, inputs: Inputs, diag: Diagnostics, model_stats: list[float] | None) -> MergeReport:
    method, labels = inputs.method, diag.labels
    model = diag.model_summary() if diag.has_task_vectors else {}
    whole = method.model_report(model_stats, labels)
    model.update(whole)
    if not whole:
        sums: dict[str, list[float]] = {}  # a slices recipe merges each model into some tensors only
        for t in diag.tensors.values():
            for lab, c in zip(t.get("models", labels), t.get("coefficients") or []):
                sums.setdefault(lab, []).append(c)
        if sums:
            model["coefficients_mean"] = {lab: sum(sums[lab]) / len(sums[lab]) for lab in labels if lab in sums}
    return MergeReport(
        method=recipe.merge_method, parameters=recipe.parameters, base=inputs.base.ref if inputs.base else None,
        models=labels, dtype=recipe.dtype, out_dtype=recipe.out_dtype, model=model, tensors=diag.tensors,
        granularity=method.report_fields().get("granularity"),
        # norms and cosines are of the raw task vectors (the orthogonality check); coefficients
        # are what the method used (for sparsified MetaGPT, from the sparsified vectors)
        diagnostics_of="raw task vectors" if diag.has_task_vectors else None,
    )


def write_side_files(tmp: Path, recipe: Recipe, inputs: Inputs, report: MergeReport,
                      recipe_text: str | None) -> None:
    ref = inputs.donor[0] if inputs.donor else (inputs.base or inputs.models[0])
    config = inputs.reference.config()
    if config:
        if recipe.out_dtype or recipe.dtype:
            config["dtype"] = recipe.out_dtype or recipe.dtype
            config.pop("torch_dtype", None)
        if inputs.plan.vocab_size:
            config["vocab_size"] = inputs.plan.vocab_size
        config.update(inputs.plan.config_updates)  # slices: the output's layer count
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = ref.path / "generation_config.json"
    if own_file(ref.path, gen):  # side files: only the folder's own regular files (no link to a secret)
        shutil.copyfile(gen, tmp / gen.name)
    for pattern in TOKENIZER_GLOBS:
        for f in sorted(inputs.tokenizer.path.glob(pattern)):
            if own_file(inputs.tokenizer.path, f):
                shutil.copyfile(f, tmp / f.name)
    (tmp / RECIPE_FILE).write_text(recipe_text if recipe_text is not None else recipe.to_yaml())
    (tmp / REPORT).write_text(report.to_json())
    (tmp / "README.md").write_text(render_model_card(recipe, report, inputs))


def provenance_of(tmp: Path, recipe: Recipe, inputs: Inputs, shard_hashes: dict[str, str], device) -> dict:
    outputs = dict(shard_hashes)
    for f in sorted(tmp.iterdir()):
        if f.is_file() and f.name not in outputs and f.name != PROVENANCE:
            outputs[f.name] = sha256_file(f)
    roles = ([("base", inputs.base)] if inputs.base else []) + [("model", m) for m in inputs.models]
    if all(inputs.tokenizer is not m for _, m in roles):
        roles.append(("tokenizer", inputs.tokenizer))
    if inputs.donor and all(inputs.donor[0] is not m for _, m in roles):
        roles.append(("config", inputs.donor[0]))
    import safetensors
    return {
        "recipe": recipe.model_dump(exclude_none=True),
        "recipe_sha256": recipe.sha256(),
        "inputs": [{"role": role, **m.to_dict()} for role, m in roles],
        "tokenizer_source": inputs.tokenizer.ref,
        "outputs": dict(sorted(outputs.items())),
        "versions": {"metamerge": __version__, "torch": torch.__version__.split("+")[0],
                     "safetensors": safetensors.__version__},
        "device": device.type,
        # What can still change the bytes is the device kind and the library versions above; the
        # thread and core counts are recorded to show they were different and did not matter.
        "environment": environment(device),
    }


def environment(device) -> dict:
    import os
    import platform

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "thread_count_changes_bytes": False}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
