"""The demo study: every merge method on the same fine-tunes, scored as in the paper's table.

Pure: recipes for each method, the choice of the "oracle" task-arithmetic lambda, the table
(rows: methods; columns: tasks and their average) and the paper's linearity check. The flow
(``flows/study.py``) runs the merges and evaluations; ``pipeline.study`` writes the report.
"""

from __future__ import annotations

from typing import Any

# The paper's sparsification density for DARE and TIES (and their MetaGPT combinations).
DENSITY = 0.55
TA_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# Where the linearity check evaluates theta_0 + alpha * tau_t.
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def study_recipes(base: str, finetunes: list[str], *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """One recipe (mergekit format) per compared method; grid points are added by ``grid_recipes``."""

    def recipe(method: str, params: dict | None = None, per_model: dict | None = None) -> dict:
        r: dict[str, Any] = {"merge_method": method, "base_model": base,
                             "models": [{"model": f, **({"parameters": dict(per_model)} if per_model else {})}
                                        for f in finetunes]}
        if params:
            r["parameters"] = params
        return r

    return {
        "metagpt": recipe("metagpt"),
        "metagpt_tensor": recipe("metagpt", {"granularity": "tensor"}),
        "metagpt_dare": recipe("metagpt", {"sparsify": "dare", "density": DENSITY, "seed": seed}),
        "metagpt_ties": recipe("metagpt", {"sparsify": "ties", "density": DENSITY}),
        "task_arithmetic_0.3": recipe("task_arithmetic", {"lambda": 0.3}, {"weight": 1.0}),
        "ties": recipe("ties", {"lambda": 1.0}, {"weight": 1.0, "density": DENSITY}),
        "dare_ties": recipe("dare_ties", {"seed": seed}, {"weight": 1.0, "density": DENSITY}),
        "dare_linear": recipe("dare_linear", {"seed": seed}, {"weight": 1.0, "density": DENSITY}),
        "breadcrumbs": recipe("breadcrumbs", None, {"weight": 1.0, "density": DENSITY}),
        "breadcrumbs_ties": recipe("breadcrumbs_ties", None, {"weight": 1.0, "density": DENSITY}),
        "della": recipe("della", {"seed": seed}, {"weight": 1.0, "density": DENSITY}),
        "della_linear": recipe("della_linear", {"seed": seed}, {"weight": 1.0, "density": DENSITY}),
        "metagpt_breadcrumbs": recipe("metagpt", {"sparsify": "breadcrumbs", "density": DENSITY}),
        "metagpt_della": recipe("metagpt", {"sparsify": "della", "density": DENSITY, "seed": seed}),
        "sce": recipe("sce", {"select_topk": DENSITY}),
        "ram": recipe("ram"),
        "ramplus_tl": recipe("ramplus_tl"),
        "multislerp": recipe("multislerp", None, {"weight": 1.0}),
        "karcher": {"merge_method": "karcher", "models": [{"model": f} for f in finetunes]},
        "model_stock": recipe("model_stock"),
        # the paper's "weight average": the fine-tunes averaged, no base
        "linear": {"merge_method": "linear",
                   "models": [{"model": f, "parameters": {"weight": 1.0}} for f in finetunes]},
    }


def grid_recipes(base: str, finetunes: list[str], grid=TA_GRID) -> dict[str, dict[str, Any]]:
    """Task arithmetic at each lambda of the grid: the search MetaGPT does without."""
    return {f"task_arithmetic_grid_{lam:g}": {
        "merge_method": "task_arithmetic", "base_model": base,
        "parameters": {"lambda": lam},
        "models": [{"model": f, "parameters": {"weight": 1.0}} for f in finetunes]} for lam in grid}


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pick_oracle(grid_scores: dict[str, dict[str, float | None]]) -> str:
    """The grid point with the best average accuracy (ties: the smaller lambda, listed first)."""
    return max(grid_scores, key=lambda k: (mean(grid_scores[k].values()) or 0.0, -list(grid_scores).index(k)))


def markdown_table(rows: dict[str, dict[str, float | None]], tasks: list[str], *, digits: int = 3,
                   title: str = "method") -> str:
    """Rows as a markdown table with an ``average`` column; None shows as a dash."""
    fmt = lambda v: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = [f"| {title} | " + " | ".join(tasks) + " | average |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for name, scores in rows.items():
        vals = [scores.get(t) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mean(vals))} |")
    return "\n".join(lines)


def linearity_error(alphas: list[float], losses: list[float]) -> float:
    """Largest gap between the loss curve and its chord from alpha=0 to 1, relative to the chord's
    rise: 0 for a straight line. This is the loss's shape, not the paper's assumption: the loss is
    curved along alpha even when the outputs are exactly linear (see ``output_linearity_error``)."""
    a0, a1 = alphas[0], alphas[-1]
    l0, l1 = losses[0], losses[-1]
    chord = [l0 + (l1 - l0) * (a - a0) / (a1 - a0) for a in alphas]
    scale = abs(l1 - l0) or 1.0
    return max(abs(loss - c) for loss, c in zip(losses, chord)) / scale


def output_linearity_error(alphas: list[float], outputs: list) -> tuple[float, list[float]]:
    """The paper's linearity check (its Figure 3 is on outputs): for each alpha,
    ``||z(alpha) - (z(0) + alpha (z(1) - z(0)))|| / ||z(1) - z(0)||`` with ``z`` the model's outputs
    (logits, any shape, the same at every alpha); returns the max over alpha and the list.
    ``alphas`` must start at 0 and end at 1. Norms in float64. 0 when the outputs are exactly linear
    along the task vector; the *loss* along alpha is curved even then, so its chord error
    (``linearity_error``) is no test of this assumption."""
    import torch

    if alphas[0] != 0 or alphas[-1] != 1:
        raise ValueError("output_linearity_error: alphas must run from 0 to 1")
    z = [torch.as_tensor(o, dtype=torch.float64) for o in outputs]
    rise = z[-1] - z[0]
    scale = float(torch.linalg.vector_norm(rise)) or 1.0
    errs = [float(torch.linalg.vector_norm(zi - (z[0] + a * rise))) / scale for a, zi in zip(alphas, z)]
    return max(errs), errs


def output_linearity(base_dir, finetune_dir, examples: list[dict], alphas=ALPHAS) -> tuple[float, list[float]]:
    """``output_linearity_error`` of ``theta_0 + alpha * tau_t`` on ``examples``: the logits at
    every position of each example's tokens (prompt and answer, as the evaluation tokenizes them),
    all examples together. One example at a time (no padding in the logits). Small models only."""
    import torch
    from transformers import AutoModelForCausalLM

    from .evalsets import encode, special_ids

    tuned, tokenizer = _tuned(base_dir, finetune_dir)
    bos, eos = special_ids(tokenizer)
    ids = [encode(tokenizer, ex, bos=bos, eos=eos).ids for ex in examples]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    outputs = []
    with torch.no_grad():
        for alpha in alphas:
            model.load_state_dict({k: base[k] + alpha * (tuned[k].float() - base[k]) for k in base})
            outputs.append(torch.cat([model(torch.tensor([x])).logits[0].double().reshape(-1) for x in ids]))
    return output_linearity_error(list(alphas), outputs)


def linearity_curve(base_dir, finetune_dir, examples: list[dict], alphas=ALPHAS,
                    *, batch_size: int = 32) -> list[float]:
    """Loss on ``examples`` of ``theta_0 + alpha * tau_t`` for each alpha (shown beside the output
    check; curved even for a model whose outputs are linear along tau_t).

    Small models only: both state dicts are held in memory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .scoring import evaluate_loaded

    tuned, tokenizer = _tuned(base_dir, finetune_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for alpha in alphas:
        model.load_state_dict({k: base[k] + alpha * (tuned[k].float() - base[k]) for k in base})
        scores = evaluate_loaded(model, tokenizer, examples, batch_size=batch_size, with_exact_match=False,
                                 progress=False)
        losses.append(float(scores.loss))
    return losses


def _tuned(base_dir, finetune) -> tuple[dict, Any]:
    """The fine-tune's full state dict and its tokenizer. ``finetune`` is a model folder, a LoRA
    adapter folder (applied to ``base_dir``) or ``BASE+ADAPTER``; an adapter is merged into its base
    by PEFT (``scoring.load_model``), so theta_0 + alpha * tau_t is taken along its exact update."""
    from pathlib import Path

    from .scoring import load_model

    text = str(finetune)
    base, plus, adapter = text.partition("+")
    if plus and (Path(adapter) / "adapter_config.json").is_file():
        model, tokenizer = load_model(adapter, base)
    else:
        model, tokenizer = load_model(finetune, base_dir)
    return model.state_dict(), tokenizer
