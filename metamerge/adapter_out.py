"""``metamerge merge --as-adapter``: a merge of LoRA adapters written as one LoRA adapter.

For ``linear``, ``task_arithmetic`` and ``metagpt`` the merged model is ``base + sum_t c_t * tau_t``
with one coefficient per adapter and tensor; when every ``tau_t`` is a LoRA update
``s_t * B_t @ A_t`` the sum is itself one:

    sum_t c_t s_t B_t A_t = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...] @ [A_1; A_2; ...]

so the output adapter's factors are the inputs' concatenated (its rank is the sum of their ranks)
with the coefficients and scales folded into ``B``, and its scaling is 1 (``lora_alpha = r`` per
module). It is exact: no truncation, unless ``--rank K`` asks for at most K per module: then each
module's update is replaced by its best rank-K approximation (truncated SVD computed from the
factors), which is approximate, and the relative error is written to the report and printed.

The coefficients are the method's own: each is read off the method's ``merge`` applied to one-hot
stand-ins for the task vectors (``_coefficients``), which for these methods (linear in the task
vectors) gives exactly the weights their merge uses.

What is not a sum of low-rank updates is refused with one line, before anything is written: another
method (sparsification, sign election and interpolation are not low rank), a full fine-tune,
``modules_to_save`` (a full tensor), a sparsifying MetaGPT, adapters over different bases,
linear weights that do not sum to 1 (the base would be scaled), a narrowing ``dtype``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_directory, out_lock
from .device import resolve_device
from .engine import (
    MergeOptions,
    _refuse_out_over_input,
    open_inputs,
)
from .errors import MergeError
from .finalize import PROVENANCE, RECIPE_FILE, TOKENIZER_GLOBS, provenance_of
from .io.adapter import AdapterReader
from .io.untrusted import own_file
from .lora import ADAPTER_CONFIG, PREFIX, load_factors
from .methods import TensorJob
from .modelcard import render_model_card
from .recipe import Recipe
from .refs import BackgroundHashes, ResolvedModel
from .report import REPORT_FILE, MergeReport
from .statistics import compute_statistics

METHODS = ("linear", "task_arithmetic", "metagpt")
WEIGHTS = "adapter_model.safetensors"
ADAPTER_NOTE = ("\nThis is a PEFT LoRA adapter (`metamerge merge --as-adapter`), exact: load it with "
                "`PeftModel.from_pretrained(base, this_folder)`.\n")


@dataclass
class AdapterMergeResult:
    out_dir: Path | None
    modules: int
    rank: int                                   # the largest module rank of the output
    coefficients: dict[str, float] = field(default_factory=dict)  # per input, averaged over modules
    truncation_error: float | None = None       # --rank: ||exact - written|| / ||exact|| over truncated modules


def merge_to_adapter(recipe: Recipe, out_dir: str | Path, options: MergeOptions | None = None, *,
                     recipe_text: str | None = None, dry_run: bool = False,
                     resolved: dict[str, ResolvedModel] | None = None, rank: int | None = None) -> AdapterMergeResult:
    """Merge the adapters of ``recipe`` into one LoRA adapter in ``out_dir`` (atomically). ``rank``:
    keep at most that rank per module (truncated SVD, approximate; the error is reported)."""
    options = options or MergeOptions()
    if rank is not None and rank < 1:
        raise MergeError(f"--rank {rank}: the rank kept per module must be at least 1")
    if recipe.merge_method not in METHODS:
        raise MergeError(f"--as-adapter: {recipe.merge_method} is not a weighted sum of the task vectors, so its "
                         f"result is not a LoRA; use {', '.join(METHODS)}, or merge to a full model")
    if recipe.slices:
        raise MergeError("--as-adapter: a slices recipe builds a new layer stack, which no adapter of the base "
                         "can express; use a models recipe")
    if recipe.dtype in ("float16", "bfloat16"):
        raise MergeError(f"--as-adapter: dtype: {recipe.dtype} rounds every input weight before merging, which no "
                         "adapter reproduces; remove dtype or use float32")
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise MergeError(f"{out.absolute()} already exists; choose another output directory or pass --overwrite")
    inputs = open_inputs(recipe, options, resolved)
    method = inputs.method
    if method.name == "metagpt" and recipe.parameters.get("sparsify", "none") != "none":
        raise MergeError("--as-adapter: metagpt with sparsify drops entries of the task vectors, which is not "
                         "low rank; remove sparsify or merge to a full model")
    if inputs.plan.shared_rows or inputs.plan.extend_from is not None:
        raise MergeError("--as-adapter: the inputs' vocabularies differ; an adapter keeps the base's")
    base_path = _common_base(inputs)
    adapters: list[AdapterReader | None] = []
    for model, reader in zip(inputs.models, inputs.readers):
        if isinstance(reader, AdapterReader):
            if reader.spec.full:
                raise MergeError(f"--as-adapter: '{model.ref}' replaces whole tensors (modules_to_save: "
                                 f"{', '.join(sorted(reader.spec.full))}), which is not low rank; merge to a full model")
            adapters.append(reader)
        elif Path(reader.path).resolve() == base_path:
            adapters.append(None)  # the base itself (linear's base_model input): no update
        else:
            raise MergeError(f"--as-adapter merges LoRA adapters only; '{model.ref}' is a full model. "
                             "Merge to a full model instead")
    fif = {bool(a.spec.config.get("fan_in_fan_out")) for a in adapters if a is not None}
    if len(fif) > 1:
        raise MergeError("--as-adapter: the adapters disagree on fan_in_fan_out; they cannot share one config")
    targets = [n for n in inputs.plan.names if any(a is not None and n in a.spec.factors for a in adapters)]
    if dry_run:
        return AdapterMergeResult(None, len(targets), 0)
    _refuse_out_over_input(out, [m for m in [inputs.base, *inputs.models] if m is not None])
    model_stats = None
    if method.needs_model_statistics():
        from math import fsum

        stats = compute_statistics(inputs, list(range(len(method.entries))), resolve_device(options.device),
                                   options.progress)
        model_stats = [fsum(s.values()) for s in stats]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, tuple[float, float]] = {}  # module -> (||kept||^2, ||exact||^2) under --rank
    sums: dict[str, list[float]] = {m.ref: [] for m in inputs.models}
    for name in targets:
        coeffs = _coefficients(method, name, adapters, model_stats)
        for model, c in zip(inputs.models, coeffs):
            sums[model.ref].append(c)
        bs: list[torch.Tensor] = []
        as_: list[torch.Tensor] = []
        kind, module = False, name
        for ad, c in zip(adapters, coeffs):
            f = ad.spec.factors.get(name) if ad is not None else None
            if f is None or ad is None or c == 0.0:
                continue
            b, a = load_factors(ad.weights, f)
            bs.append(b * (c * f.scale))
            as_.append(a)
            kind, module = f.embedding, f.module
        if not bs:
            continue  # every coefficient is 0: no update to this tensor
        keys = ("lora_embedding_A", "lora_embedding_B") if kind else ("lora_A.weight", "lora_B.weight")
        b_cat, a_cat = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        if rank is not None and a_cat.shape[0] > rank:
            b_cat, a_cat, kept, total = truncate(b_cat, a_cat, rank)
            errors[module] = (kept, total)
        tensors[f"{PREFIX}{module}.{keys[0]}"] = a_cat.float().contiguous()
        tensors[f"{PREFIX}{module}.{keys[1]}"] = b_cat.float().contiguous()
        ranks[module] = a_cat.shape[0]
    if not ranks:
        raise MergeError("--as-adapter: every coefficient is 0, so the merge is the base; there is no adapter to write")
    config = _config(recipe, inputs, adapters, ranks, fif.pop() if fif else False)
    means = {ref: sum(v) / len(v) for ref, v in sums.items() if v}
    labels = [m.ref for m in inputs.models]
    whole: dict = {"output": "lora_adapter", "exact": not errors, "ranks": dict(sorted(ranks.items()))}
    relative_error = None
    if errors:
        total = math.fsum(t for _, t in errors.values())
        lost = math.fsum(t - k for k, t in errors.values())
        relative_error = math.sqrt(max(lost, 0.0) / total) if total else 0.0
        whole["truncation"] = {  # ||exact - kept||_F / ||exact||_F of the truncated modules' updates
            "rank": rank, "relative_error": relative_error,
            "modules": {m: math.sqrt(max(t - k, 0.0) / t) if t else 0.0 for m, (k, t) in sorted(errors.items())}}
    whole.update(method.model_report(model_stats, labels) or {"coefficients_mean": means})
    report = MergeReport(method=recipe.merge_method, models=labels, base=inputs.base.ref if inputs.base else None,
                         parameters=recipe.parameters, granularity=method.report_fields().get("granularity"),
                         dtype=recipe.dtype, out_dtype="float32", model=whole)
    pinned: list[ResolvedModel | None] = [inputs.base, *inputs.models, inputs.tokenizer]
    with out_lock(out, wait=options.wait), BackgroundHashes(pinned if options.hash_inputs else []) as hashes, \
            atomic_directory(out, overwrite=options.overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for pattern in TOKENIZER_GLOBS:  # the tokenizer too, so the folder is loadable on its own
            for tok in sorted(inputs.tokenizer.path.glob(pattern)):
                if own_file(inputs.tokenizer.path, tok):
                    shutil.copyfile(tok, tmp / tok.name)
        hashes.wait()
        # the side files of a full merge (recipe, report, card, provenance), so the registry and
        # the audit treat the adapter like any merge output
        (tmp / RECIPE_FILE).write_text(recipe_text if recipe_text is not None else recipe.to_yaml())
        (tmp / REPORT_FILE).write_text(report.to_json())
        (tmp / "README.md").write_text(render_model_card(recipe, report, inputs) + ADAPTER_NOTE)
        provenance = provenance_of(tmp, recipe, inputs, {}, resolve_device(options.device))
        provenance["output"] = "lora_adapter"
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return AdapterMergeResult(out, len(ranks), max(ranks.values()), means, relative_error)


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``rank`` approximation of ``B @ A`` (Frobenius norm, Eckart-Young) as factors,
    from the factors alone: ``B = Qb Rb``, ``A^T = Qa Ra``, SVD of the small core ``Rb Ra^T``. Returns
    the new ``B``, ``A`` and the squared norms of the kept and of the exact update (float64)."""
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)
    kept = sv[:rank]
    return (qb @ u[:, :rank]) * kept, (qa @ vh[:rank].T).T, math.fsum((kept ** 2).tolist()), \
        math.fsum((sv ** 2).tolist())


def _common_base(inputs) -> Path:
    """The one base every adapter is over, which must also be the recipe's base."""
    bases = {Path(r.base_path).resolve() for r in inputs.readers if isinstance(r, AdapterReader)}
    if not bases:
        raise MergeError("--as-adapter merges LoRA adapters; the recipe lists none (only full models)")
    if len(bases) > 1:
        raise MergeError("--as-adapter: the adapters are over different base models "
                         f"({', '.join(map(str, sorted(bases)))}); their merge is not an adapter of one base")
    base = bases.pop()
    if inputs.base is not None and Path(inputs.base.path).resolve() != base:
        raise MergeError(f"--as-adapter: the adapters are over {base}, not the recipe's base_model "
                         f"'{inputs.base.ref}'; apply them to that base")
    return base


def _coefficients(method, name: str, adapters: list, model_stats: list[float] | None) -> list[float]:
    """The weight of each input's update in ``name``: the method's merge of one-hot stand-ins for the
    task vectors (over a zero base), in float64. For metagpt with per-tensor granularity the
    stand-ins' norms are not the task vectors', so the statistic is this tensor's squared norms,
    from the factors, handed in as if whole-model."""
    n = len(adapters)
    eye = torch.eye(n, dtype=torch.float64)
    globals_, per = method.resolve(name)
    if method.name == "metagpt" and globals_["granularity"] == "tensor":
        model_stats = [a.factor_sqnorm(name) if a is not None and name in a.spec.factors else 0.0 for a in adapters]
        globals_ = {**globals_, "granularity": "model"}
    if method.task_vectors:
        job = TensorJob(name, torch.zeros(n, dtype=torch.float64), [], list(eye.unbind(0)), per, globals_,
                        model_stats)
        return method.merge(job).tensor.tolist()
    coeffs = method.merge(TensorJob(name, None, list(eye.unbind(0)), None, per, globals_, model_stats)).tensor.tolist()
    total = sum(coeffs)
    if abs(total - 1.0) > 1e-9:
        raise MergeError(f"--as-adapter: the linear weights for '{name}' sum to {total:g}, not 1, which scales the "
                         "base too; set normalize: true or weights that sum to 1")
    return coeffs


def _config(recipe: Recipe, inputs, adapters: list, ranks: dict[str, int], fif: bool) -> dict:
    """A PEFT LoRA config whose scaling is 1 for every module: ``lora_alpha = r`` per module."""
    first = next(a for a in adapters if a is not None)
    top = max(ranks.values())
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != top}
    return {
        "peft_type": "LORA", "task_type": first.spec.config.get("task_type"),
        "base_model_name_or_path": recipe.base_model or first.spec.base_model_name,
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "fan_in_fan_out": fif, "use_rslora": False, "use_dora": False,
        "bias": "none", "lora_dropout": 0.0, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True,
    }
