"""Scoring one causal LM on eval sets: mean token loss, perplexity and exact match.

Aggregation
    ``loss`` is the *token-weighted* mean cross-entropy (nats) over all scored tokens of the whole
    set, i.e. sum of token losses / number of scored tokens, not a mean of per-example means; long
    completions weigh more. ``perplexity = exp(loss)``. ``exact_match`` is the fraction of
    completion examples whose greedy generation, cut at EOS and decoded without special tokens,
    equals the completion after ``str.strip()`` on both sides; it is ``None`` for text sets.

What is scored (the tokenisation) is in ``evalsets``; the greedy loop is the core's
(``metamerge.greedy``), shared with the demo scenario.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from metamerge.device import model_device, resolve_device
from metamerge.errors import EvalSetError, MergeError
from metamerge.greedy import greedy_decode
from metamerge.progress import progress_bar

from .evalsets import (
    COMPLETION,
    Encoded,
    PathLike,
    encode,
    examples_kind,
    load_eval_sets,
    pad_id,
    plain_ids,
    special_ids,
    stop_ids,
)


@dataclass(frozen=True)
class TaskScores:
    """Scores of one model on one task's eval set.

    ``loss`` is token-weighted (see module docstring); ``n_tokens`` is the number of scored tokens it
    averages over, so two results can be pooled exactly. ``exact_match``/``n_exact``/
    ``max_new_tokens`` are ``None`` for text sets, or when exact match was not asked for.
    """

    kind: str  # "completion" or "text"
    n: int  # number of examples
    n_tokens: int  # number of scored tokens (the loss denominator)
    loss: float  # mean token cross-entropy in nats
    perplexity: float  # exp(loss); inf if it overflows
    exact_match: float | None = None  # fraction in [0, 1]
    n_exact: int | None = None  # number of exact matches
    max_new_tokens: int | None = None  # generation budget used for exact match

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats (an overflowing perplexity) become ``None``."""
        return {k: finite_or_none(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskScores:
        """Inverse of :meth:`to_dict`, so ``eval.json`` can be read back into objects."""
        loss = float(data["loss"])
        ppl = data.get("perplexity")
        return cls(
            kind=str(data["kind"]),
            n=int(data["n"]),
            n_tokens=int(data["n_tokens"]),
            loss=loss,
            perplexity=_safe_exp(loss) if ppl is None else float(ppl),
            exact_match=None if data.get("exact_match") is None else float(data["exact_match"]),
            n_exact=None if data.get("n_exact") is None else int(data["n_exact"]),
            max_new_tokens=None if data.get("max_new_tokens") is None else int(data["max_new_tokens"]),
        )


def finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _safe_exp(x: float) -> float:
    """exp without OverflowError: a diverged model must still produce a report."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); stable, so deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def _sum_token_losses(model: torch.nn.Module, encoded: Sequence[Encoded], *, batch_size: int, pad: int,
                      device: torch.device, bar_desc: str, progress: bool) -> tuple[float, int]:
    """Sum of cross-entropy over scored tokens and their count, batched with right padding.

    Right padding with an attention mask leaves the real tokens' positions and attention exactly
    as unpadded (the model is causal), so batching does not change the numbers beyond float noise.
    The sum is accumulated in float64 so the mean is independent of batch order.
    """
    batches = _batches_by_length([len(e.ids) for e in encoded], batch_size)
    total, count = 0.0, 0
    with progress_bar(len(batches), bar_desc, progress, unit="batch") as bar:
        for idx in batches:
            ids, mask, scored = _right_padded([encoded[i] for i in idx], pad)
            ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # position p predicts token p+1: score targets where scored[:, 1:] is set
            target_mask = scored[:, 1:]
            logits_sel = logits[:, :-1][target_mask].float()
            targets = ids[:, 1:][target_mask]
            losses = torch.nn.functional.cross_entropy(logits_sel, targets, reduction="none")
            total += float(losses.double().sum().item())
            count += int(target_mask.sum().item())
            bar.update(1)
    return total, count


def _right_padded(batch: Sequence[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, enc in enumerate(batch):
        n = len(enc.ids)
        ids[row, :n] = torch.tensor(enc.ids, dtype=torch.long)
        mask[row, :n] = 1
        scored[row, enc.n_context : n] = True
    return ids, mask, scored


# --------------------------------------------------------------------------------------------------
# Exact match
# --------------------------------------------------------------------------------------------------


def _count_exact(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Mapping[str, str]],
                 encoded: Sequence[Encoded], *, batch_size: int, max_new_tokens: int, pad: int,
                 device: torch.device, bar_desc: str, progress: bool) -> int:
    prompts = [e.ids[: e.n_context] for e in encoded]
    stops = stop_ids(model, tokenizer)
    batches = _batches_by_length([len(p) for p in prompts], batch_size)
    hits = 0
    with progress_bar(len(batches), bar_desc, progress, unit="batch") as bar:
        for idx in batches:
            generated = greedy_decode(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                      stop_ids=stops, pad_id=pad, device=device)
            for i, tokens in zip(idx, generated):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                hits += int(text.strip() == examples[i]["completion"].strip())
            bar.update(1)
    return hits


def _default_max_new_tokens(tokenizer: Any, examples: Sequence[Mapping[str, str]]) -> int:
    """Room for the longest reference completion plus 2 (its EOS and one token of slack)."""
    return max(len(plain_ids(tokenizer, ex["completion"])) for ex in examples) + 2


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def evaluate_loaded(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    device: str | torch.device | None = None,
    with_exact_match: bool = True,
    progress: bool = True,
    desc: str = "eval",
) -> TaskScores:
    """Score an already-loaded model on one eval set (in memory); see the module docstring.

    ``device=None`` keeps the model where it is; otherwise the model is moved there. The model is put
    in eval mode for the call and its previous training flag restored. ``with_exact_match=False``
    skips generation (the expensive part) when only the loss is wanted, e.g. on the linearity path.
    """
    kind = examples_kind(examples)
    if device is not None:
        model.to(resolve_device(device))
    run_device = model_device(model)
    bos, eos = special_ids(tokenizer)
    encoded = [encode(tokenizer, ex, bos=bos, eos=eos) for ex in examples]
    pad = pad_id(tokenizer)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = _sum_token_losses(model, encoded, batch_size=batch_size, pad=pad, device=run_device,
                                             bar_desc=f"{desc} loss", progress=progress)
            if count == 0:
                raise EvalSetError(f"{desc}: no tokens to score (empty texts/completions and no EOS token)")
            exact = n_exact = budget = None
            if kind == COMPLETION and with_exact_match:
                budget = max_new_tokens if max_new_tokens is not None else _default_max_new_tokens(tokenizer, examples)
                n_exact = _count_exact(model, tokenizer, examples, encoded, batch_size=batch_size,
                                       max_new_tokens=budget, pad=pad, device=run_device,
                                       bar_desc=f"{desc} generate", progress=progress)
                exact = n_exact / len(examples)
    finally:
        model.train(was_training)

    loss = total / count
    return TaskScores(kind=kind, n=len(examples), n_tokens=count, loss=loss, perplexity=_safe_exp(loss),
                      exact_match=exact, n_exact=n_exact, max_new_tokens=budget)


def evaluate_model(
    model_dir: PathLike,
    eval_sets: Mapping[str, PathLike],
    *,
    device: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    with_exact_match: bool = True,
    progress: bool = True,
    base_dir: PathLike | None = None,
) -> dict[str, TaskScores]:
    """Load a saved model (float32, no remote code) and score it on every task's eval set. A PEFT
    LoRA adapter folder is loaded onto its base (``base_dir``, else the adapter's
    ``base_model_name_or_path``), see ``load_model``.

    All eval sets are read before the model is loaded, so a malformed file fails fast. Returns
    ``{task: TaskScores}`` in the order of ``eval_sets``.
    """
    examples = load_eval_sets(eval_sets)
    run_device = resolve_device(device)
    model, tokenizer = load_model(model_dir, base_dir)
    model.to(run_device)
    try:
        return {
            task: evaluate_loaded(model, tokenizer, task_examples, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, with_exact_match=with_exact_match,
                                  progress=progress, desc=task)
            for task, task_examples in examples.items()
        }
    finally:
        del model
        if run_device.type == "cuda":
            torch.cuda.empty_cache()


def load_model(model_dir: PathLike, base_dir: PathLike | None = None):
    """The model saved in ``model_dir`` and its tokenizer, float32, no remote code.

    A LoRA adapter folder (``adapter_config.json``: an input adapter, or ``metamerge merge
    --as-adapter``'s output) is loaded onto its base with PEFT and merged into it
    (``merge_and_unload``), so it is scored exactly as the full model it stands for. The base is
    ``base_dir``, else the adapter's ``base_model_name_or_path``; the tokenizer is the folder's own
    when it has one, else the base's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    config = model_dir / "adapter_config.json"
    if not config.is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False), tokenizer
    from peft import PeftModel

    base = base_dir or json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{model_dir}: a LoRA adapter that names no base model; give the base to evaluate it on")
    has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir if has_tokenizer else base, trust_remote_code=False)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=False)
    return PeftModel.from_pretrained(full, model_dir).merge_and_unload(), tokenizer
