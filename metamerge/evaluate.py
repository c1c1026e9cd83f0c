"""Evaluation core: loss, perplexity and exact match of causal LMs on small local eval sets.

This module is deliberately pure (no Prefect, MLflow or DVC): it reads JSONL eval sets, scores a model
on them and builds the JSON/CSV outputs that the pipeline tracks. The pipeline wraps it in tasks.

Eval sets
    One JSONL file per task. Each non-blank line is an object, either
    ``{"prompt": str, "completion": str}`` (a *completion* set) or ``{"text": str}`` (a *text* set);
    one kind per file. Other keys are ignored (e.g. an ``id``).

Tokenization (what the loss is measured on)
    completion example: ``[BOS] + prompt + completion + [EOS]``; the loss covers the completion
    tokens *and* the EOS token (knowing where to stop is part of the answer). The prompt is context
    only. BOS is added when the tokenizer itself adds one (as Llama's does); EOS is appended when the
    tokenizer has one.
    text example: ``[BOS] + text + [EOS]``; the loss covers every token after the first.
    Prompt and completion are tokenized separately, so the boundary between them is exact.

Aggregation
    ``loss`` is the *token-weighted* mean cross-entropy (nats) over all scored tokens of the whole
    set, i.e. sum of token losses / number of scored tokens, not a mean of per-example means; long
    completions weigh more. ``perplexity = exp(loss)``. ``exact_match`` is the fraction of
    completion examples whose greedy generation, cut at EOS and decoded without special tokens,
    equals the completion after ``str.strip()`` on both sides; it is ``None`` for text sets.

The MetaGPT objective
    ``loss_difference``: ``L_t(merged) - L_t(expert_t)`` on task t's own set; its mean over tasks
    is the average loss difference (ALD) that MetaGPT minimises (lower is better, 0 means the merged
    model is as good as every expert on its own task).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TaskScores",
    "load_eval_set",
    "load_eval_sets",
    "resolve_device",
    "evaluate_loaded",
    "evaluate_model",
    "loss_difference",
    "average_loss_difference",
    "normalized_scores",
    "average_normalized_score",
    "summarize",
    "score_table",
    "write_eval_outputs",
    "run_lm_eval",
]

COMPLETION = "completion"
TEXT = "text"

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}

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


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _safe_exp(x: float) -> float:
    """exp without OverflowError: a diverged model must still produce a report."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------------
# Eval sets
# --------------------------------------------------------------------------------------------------


def load_eval_set(path: PathLike) -> list[dict[str, str]]:
    """Read a JSONL eval set, failing with a one-line ``ValueError`` that names file and line.

    Blank lines are skipped. Each example is returned with only the keys the evaluator uses
    (``prompt``/``completion`` or ``text``), so later code never has to re-validate.
    """
    path = Path(path)
    examples: list[dict[str, str]] = []
    kind: str | None = None
    first_line = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start})") from None
            if not line.strip():
                continue
            example, this_kind = _parse_line(line, path, lineno)
            if kind is None:
                kind, first_line = this_kind, lineno
            elif this_kind != kind:
                raise ValueError(
                    f"{path}:{lineno}: a {this_kind} example in a {kind} set (first example at line "
                    f"{first_line}); use one kind per file"
                )
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: empty eval set (no examples)")
    return examples


def _parse_line(line: str, path: Path, lineno: int) -> tuple[dict[str, str], str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    try:
        return _validate_example(obj)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _validate_example(obj: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Check one example's keys and types; returns the cleaned example and its kind."""
    has_pair = "prompt" in obj or "completion" in obj
    has_text = "text" in obj
    if has_pair and has_text:
        raise ValueError("has both 'text' and 'prompt'/'completion'; use one form")
    if has_text:
        if not isinstance(obj["text"], str):
            raise ValueError(f"'text' must be a string, got {type(obj['text']).__name__}")
        return {"text": obj["text"]}, TEXT
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        raise ValueError(
            f"missing key(s) {missing}; expected 'prompt' and 'completion', or 'text' "
            f"(keys present: {sorted(obj)})"
        )
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            raise ValueError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    return {"prompt": obj["prompt"], "completion": obj["completion"]}, COMPLETION


def _examples_kind(examples: Sequence[Mapping[str, Any]]) -> str:
    """Validate in-memory examples the same way as files, and return their common kind."""
    if not examples:
        raise ValueError("empty eval set (no examples)")
    kinds = set()
    for i, ex in enumerate(examples):
        try:
            kinds.add(_validate_example(ex)[1])
        except ValueError as exc:
            raise ValueError(f"example {i}: {exc}") from None
    if len(kinds) > 1:
        raise ValueError("eval set mixes text and prompt/completion examples; use one kind")
    return kinds.pop()


def load_eval_sets(eval_sets: Mapping[str, PathLike]) -> dict[str, list[dict[str, str]]]:
    """Load every task's set up front, so a bad file fails before a model is loaded."""
    return {task: load_eval_set(path) for task, path in eval_sets.items()}


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    """One tokenized example: ``ids[n_context:]`` are the scored tokens."""

    ids: list[int]
    n_context: int


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own template prepends BOS (Llama does, GPT-2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode(tokenizer: Any, example: Mapping[str, str], *, bos: list[int], eos: list[int]) -> _Encoded:
    """Tokenize as documented in the module docstring: BOS? + context + scored tokens + EOS?."""
    if "text" in example:
        ids = bos + _plain_ids(tokenizer, example["text"]) + eos
        return _Encoded(ids=ids, n_context=1)
    prompt = bos + _plain_ids(tokenizer, example["prompt"])
    if not prompt:
        raise ValueError(
            "an example has an empty prompt and the tokenizer adds no BOS token, so the first "
            "completion token has no context to be predicted from"
        )
    ids = prompt + _plain_ids(tokenizer, example["completion"]) + eos
    return _Encoded(ids=ids, n_context=len(prompt))


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos = [eos_id] if eos_id is not None else []
    return bos, eos


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids that end a generation: the tokenizer's plus the model's (Llama 3 has several)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return ids


def _pad_id(tokenizer: Any) -> int:
    """Any valid id works (padded positions are masked), but a real one keeps embeddings in range."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------------
# Devices and batching helpers
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto"`` to CUDA when available, else CPU; asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); stable, so deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _want_progress(progress: bool) -> bool:
    """A bar only for a human watching: never in logs, CI or captured test output."""
    try:
        return bool(progress) and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def _sum_token_losses(
    model: torch.nn.Module,
    encoded: Sequence[_Encoded],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bar_desc: str,
    progress: bool,
) -> tuple[float, int]:
    """Sum of cross-entropy over scored tokens and their count, batched with right padding.

    Right padding with an attention mask leaves the real tokens' positions and attention exactly
    as unpadded (the model is causal), so batching does not change the numbers beyond float noise.
    The sum is accumulated in float64 so the mean is independent of batch order.
    """
    batches = _batches_by_length([len(e.ids) for e in encoded], batch_size)
    total, count = 0.0, 0
    with _progress_bar(len(batches), bar_desc, progress) as bar:
        for idx in batches:
            ids, mask, scored = _right_padded([encoded[i] for i in idx], pad_id)
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


def _right_padded(batch: Sequence[_Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, enc in enumerate(batch):
        n = len(enc.ids)
        ids[row, :n] = torch.tensor(enc.ids, dtype=torch.long)
        mask[row, :n] = 1
        scored[row, enc.n_context : n] = True
    return ids, mask, scored


# --------------------------------------------------------------------------------------------------
# Greedy generation (exact match)
# --------------------------------------------------------------------------------------------------


def _greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch; returns each row's new tokens, stop token excluded.

    A small explicit loop rather than ``model.generate``: ``generate`` merges the checkpoint's
    ``generation_config`` (repetition penalties, suppressed tokens, sampling defaults), which would
    make "greedy" depend on what the fine-tune shipped. Position ids come from the attention mask,
    so left padding does not shift positions.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = _forward_extras(model)

    out_tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        kwargs = {"position_ids": step_pos} if extra["position_ids"] else {}
        if extra["logits_to_keep"]:
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=step_ids, attention_mask=mask, past_key_values=past, use_cache=True, **kwargs)
        past = out.past_key_values
        next_ids = out.logits[:, -1, :].argmax(dim=-1)
        for row, tok in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if tok in stop_ids:
                done[row] = True
            else:
                out_tokens[row].append(tok)
        if all(done):
            break
        step_ids = next_ids[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    return out_tokens


def _forward_extras(model: torch.nn.Module) -> dict[str, bool]:
    """Which optional forward arguments this architecture accepts."""
    params = inspect.signature(model.forward).parameters
    return {"position_ids": "position_ids" in params, "logits_to_keep": "logits_to_keep" in params}


def _count_exact(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    encoded: Sequence[_Encoded],
    *,
    batch_size: int,
    max_new_tokens: int,
    pad_id: int,
    device: torch.device,
    bar_desc: str,
    progress: bool,
) -> int:
    prompts = [e.ids[: e.n_context] for e in encoded]
    stop_ids = _stop_ids(model, tokenizer)
    batches = _batches_by_length([len(p) for p in prompts], batch_size)
    hits = 0
    with _progress_bar(len(batches), bar_desc, progress) as bar:
        for idx in batches:
            generated = _greedy_generate(
                model,
                [prompts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
                pad_id=pad_id,
                device=device,
            )
            for i, tokens in zip(idx, generated):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                hits += int(text.strip() == examples[i]["completion"].strip())
            bar.update(1)
    return hits


def _default_max_new_tokens(tokenizer: Any, examples: Sequence[Mapping[str, str]]) -> int:
    """Room for the longest reference completion plus 2 (its EOS and one token of slack)."""
    return max(len(_plain_ids(tokenizer, ex["completion"])) for ex in examples) + 2


# --------------------------------------------------------------------------------------------------
# Public evaluation entry points
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
    kind = _examples_kind(examples)
    if device is not None:
        model.to(resolve_device(device))
    run_device = _model_device(model)
    bos, eos = _special_ids(tokenizer)
    encoded = [_encode(tokenizer, ex, bos=bos, eos=eos) for ex in examples]
    pad_id = _pad_id(tokenizer)
    show = _want_progress(progress)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = _sum_token_losses(
                model, encoded, batch_size=batch_size, pad_id=pad_id, device=run_device,
                bar_desc=f"{desc} loss", progress=show,
            )
            if count == 0:
                raise ValueError(f"{desc}: no tokens to score (empty texts/completions and no EOS token)")
            exact = n_exact = budget = None
            if kind == COMPLETION and with_exact_match:
                budget = max_new_tokens if max_new_tokens is not None else _default_max_new_tokens(tokenizer, examples)
                n_exact = _count_exact(
                    model, tokenizer, examples, encoded, batch_size=batch_size, max_new_tokens=budget,
                    pad_id=pad_id, device=run_device, bar_desc=f"{desc} generate", progress=show,
                )
                exact = n_exact / len(examples)
    finally:
        model.train(was_training)

    loss = total / count
    return TaskScores(
        kind=kind, n=len(examples), n_tokens=count, loss=loss, perplexity=_safe_exp(loss),
        exact_match=exact, n_exact=n_exact, max_new_tokens=budget,
    )


def evaluate_model(
    model_dir: PathLike,
    eval_sets: Mapping[str, PathLike],
    *,
    device: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    with_exact_match: bool = True,
    progress: bool = True,
) -> dict[str, TaskScores]:
    """Load a saved model (float32, no remote code) and score it on every task's eval set.

    All eval sets are read before the model is loaded, so a malformed file fails fast. Returns
    ``{task: TaskScores}`` in the order of ``eval_sets``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = load_eval_sets(eval_sets)
    run_device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    model.to(run_device)
    try:
        return {
            task: evaluate_loaded(
                model, tokenizer, task_examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                with_exact_match=with_exact_match, progress=progress, desc=task,
            )
            for task, task_examples in examples.items()
        }
    finally:
        del model
        if run_device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The MetaGPT objective and normalized scores
# --------------------------------------------------------------------------------------------------


def loss_difference(merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]) -> dict[str, float]:
    """``{task: L_t(merged) - L_t(expert_t)}``: what replacing each expert by the merge costs on its task.

    ``experts[t]`` is task t's own expert scored on task t's set. Tasks follow ``experts``' order.
    """
    missing = [t for t in experts if t not in merged]
    if missing:
        raise KeyError(f"merged scores lack task(s) {missing}")
    return {t: merged[t].loss - experts[t].loss for t in experts}


def average_loss_difference(merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]) -> float:
    """ALD, the quantity MetaGPT minimises: the mean of :func:`loss_difference` over tasks."""
    diffs = loss_difference(merged, experts)
    if not diffs:
        raise ValueError("no tasks to average over")
    return sum(diffs.values()) / len(diffs)


def normalized_scores(
    merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]
) -> dict[str, float | None]:
    """``{task: EM(merged on t) / EM(expert_t on t)}``, how much of each expert's accuracy survives.

    ``None`` where the ratio is undefined: a text set (no exact match), exact match not computed,
    or an expert that scores 0 (a ratio to zero says nothing about retention; the loss difference
    still covers that task). A ``None`` task is left out of :func:`average_normalized_score`.
    """
    missing = [t for t in experts if t not in merged]
    if missing:
        raise KeyError(f"merged scores lack task(s) {missing}")
    out: dict[str, float | None] = {}
    for t, expert in experts.items():
        ours, ref = merged[t].exact_match, expert.exact_match
        out[t] = None if ours is None or ref is None or ref == 0 else ours / ref
    return out


def average_normalized_score(
    merged: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]
) -> float | None:
    """Mean of the defined normalized scores; ``None`` when no task defines one."""
    values = [v for v in normalized_scores(merged, experts).values() if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------------
# Summary (eval.json) and tables
# --------------------------------------------------------------------------------------------------


def summarize(
    scores: Mapping[str, Mapping[str, TaskScores]],
    *,
    merged: str = "merged",
    expert_of: Mapping[str, str] | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """Build the JSON-serialisable evaluation summary (``eval.json``).

    ``scores`` is ``{model_name: {task: TaskScores}}`` (merged, base, experts, other methods).
    ``expert_of`` maps each task to the model name of its expert; by default the expert of task t
    is the model named t. The objective (loss differences, ALD, normalized exact match) is computed
    for every model that was scored on all tasks, so several merge methods can be compared; the
    ``merged`` model's values are repeated at top level for DVC metrics.
    """
    if merged not in scores:
        raise KeyError(f"merged model {merged!r} not in scores (models: {list(scores)})")
    if base is not None and base not in scores:
        raise KeyError(f"base model {base!r} not in scores (models: {list(scores)})")
    tasks = list(expert_of) if expert_of is not None else list(scores[merged])
    expert_of = dict(expert_of) if expert_of is not None else {t: t for t in tasks}
    experts = _expert_scores(scores, expert_of)

    objective = {
        name: _objective(per_task, experts)
        for name, per_task in scores.items()
        if all(t in per_task for t in tasks)
    }
    if merged not in objective:
        raise KeyError(f"merged model {merged!r} lacks task(s) {[t for t in tasks if t not in scores[merged]]}")
    return {
        "merged": merged,
        "base": base,
        "tasks": tasks,
        "expert_of": expert_of,
        **objective[merged],
        "objective": objective,
        "scores": {name: {t: s.to_dict() for t, s in per_task.items()} for name, per_task in scores.items()},
    }


def _expert_scores(
    scores: Mapping[str, Mapping[str, TaskScores]], expert_of: Mapping[str, str]
) -> dict[str, TaskScores]:
    experts = {}
    for task, model in expert_of.items():
        if model not in scores or task not in scores[model]:
            raise KeyError(f"no scores for expert {model!r} on its own task {task!r}")
        experts[task] = scores[model][task]
    return experts


def _objective(per_task: Mapping[str, TaskScores], experts: Mapping[str, TaskScores]) -> dict[str, Any]:
    return {
        "loss_difference": loss_difference(per_task, experts),
        "average_loss_difference": average_loss_difference(per_task, experts),
        "normalized_exact_match": normalized_scores(per_task, experts),
        "average_normalized_exact_match": average_normalized_score(per_task, experts),
    }


_OBJECTIVE_METRICS = ("loss_difference", "normalized_exact_match")


def score_table(summary: Mapping[str, Any], metric: str = "exact_match") -> dict[str, dict[str, float | None]]:
    """``{model: {task: value}}`` for one metric, in report row order; the input of ``plot_scores``.

    ``metric`` is a TaskScores field (``loss``, ``perplexity``, ``exact_match``, ...) or an
    objective metric (``loss_difference``, ``normalized_exact_match``; only models scored on every
    task have those).
    """
    table: dict[str, dict[str, float | None]] = {}
    for name in _row_order(summary):
        if metric in _OBJECTIVE_METRICS:
            if name in summary["objective"]:
                table[name] = dict(summary["objective"][name][metric])
        else:
            per_task = summary["scores"][name]
            table[name] = {t: per_task[t].get(metric) for t in summary["tasks"] if t in per_task}
    return table


def _row_order(summary: Mapping[str, Any]) -> list[str]:
    """merged, base, the experts in task order, then any other models in their given order."""
    first = [summary["merged"]]
    if summary.get("base"):
        first.append(summary["base"])
    first += list(summary["expert_of"].values())
    first += list(summary["scores"])
    return list(dict.fromkeys(n for n in first if n in summary["scores"]))


def _role(summary: Mapping[str, Any], name: str) -> str:
    if name == summary["merged"]:
        return "merged"
    if name == summary.get("base"):
        return "base"
    tasks = [t for t, m in summary["expert_of"].items() if m == name]
    return "expert:" + ",".join(tasks) if tasks else "other"


_CSV_TASK_METRICS = ("loss", "perplexity", "exact_match")


def _csv_text(summary: Mapping[str, Any]) -> str:
    """One row per model; columns ``<task>/<metric>`` then the averaged objective."""
    tasks = summary["tasks"]
    header = ["model", "role"] + [f"{t}/{m}" for t in tasks for m in _CSV_TASK_METRICS]
    header += [f"{t}/loss_difference" for t in tasks]
    header += ["average_loss_difference", "average_normalized_exact_match"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for name in _row_order(summary):
        per_task = summary["scores"][name]
        obj = summary["objective"].get(name, {})
        row: list[Any] = [name, _role(summary, name)]
        row += [per_task.get(t, {}).get(m) for t in tasks for m in _CSV_TASK_METRICS]
        row += [obj.get("loss_difference", {}).get(t) for t in tasks]
        row += [obj.get("average_loss_difference"), obj.get("average_normalized_exact_match")]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf by None recursively: strict JSON parsers (DVC metrics) reject them."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return _finite_or_none(value)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_eval_outputs(out_dir: PathLike, results: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``eval.json`` (the summary, strict JSON) and ``eval.csv`` (one row per model), atomically.

    ``results`` is the dict returned by :func:`summarize`. Returns ``{"json": path, "csv": path}``.
    """
    out = Path(out_dir)
    json_path, csv_path = out / "eval.json", out / "eval.csv"
    text = json.dumps(_json_safe(results), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _atomic_write_text(json_path, text)
    _atomic_write_text(csv_path, _csv_text(results))
    return {"json": json_path, "csv": csv_path}


# --------------------------------------------------------------------------------------------------
# Optional: EleutherAI lm-evaluation-harness
# --------------------------------------------------------------------------------------------------


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
