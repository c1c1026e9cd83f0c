"""Eval sets: reading and checking the JSONL files, and tokenising their examples for scoring.

Eval sets
    One JSONL file per task. Each non-blank line is an object, either
    ``{"prompt": str, "completion": str}`` (a *completion* set) or ``{"text": str}`` (a *text* set);
    one kind per file. Other keys are ignored (e.g. an ``id``). A malformed file is one
    ``EvalSetError`` line naming the file and line.

Tokenization (what the loss is measured on)
    completion example: ``[BOS] + prompt + completion + [EOS]``; the loss covers the completion
    tokens *and* the EOS token (knowing where to stop is part of the answer). The prompt is context
    only. BOS is added when the tokenizer itself adds one (as Llama's does); EOS is appended when the
    tokenizer has one.
    text example: ``[BOS] + text + [EOS]``; the loss covers every token after the first.
    Prompt and completion are tokenized separately, so the boundary between them is exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metamerge.errors import EvalSetError

COMPLETION = "completion"
TEXT = "text"

PathLike = str | os.PathLike


def load_eval_set(path: PathLike) -> list[dict[str, str]]:
    """Read a JSONL eval set, failing with a one-line ``EvalSetError`` that names file and line.

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
                raise EvalSetError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start})") from None
            if not line.strip():
                continue
            example, this_kind = _parse_line(line, path, lineno)
            if kind is None:
                kind, first_line = this_kind, lineno
            elif this_kind != kind:
                raise EvalSetError(
                    f"{path}:{lineno}: a {this_kind} example in a {kind} set (first example at line "
                    f"{first_line}); use one kind per file"
                )
            examples.append(example)
    if not examples:
        raise EvalSetError(f"{path}: empty eval set (no examples)")
    return examples


def _parse_line(line: str, path: Path, lineno: int) -> tuple[dict[str, str], str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalSetError(f"{path}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise EvalSetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    try:
        return _validate_example(obj)
    except EvalSetError as exc:
        raise EvalSetError(f"{where}: {exc}") from None


def _validate_example(obj: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Check one example's keys and types; returns the cleaned example and its kind."""
    has_pair = "prompt" in obj or "completion" in obj
    has_text = "text" in obj
    if has_pair and has_text:
        raise EvalSetError("has both 'text' and 'prompt'/'completion'; use one form")
    if has_text:
        if not isinstance(obj["text"], str):
            raise EvalSetError(f"'text' must be a string, got {type(obj['text']).__name__}")
        return {"text": obj["text"]}, TEXT
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        raise EvalSetError(
            f"missing key(s) {missing}; expected 'prompt' and 'completion', or 'text' "
            f"(keys present: {sorted(obj)})"
        )
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            raise EvalSetError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    return {"prompt": obj["prompt"], "completion": obj["completion"]}, COMPLETION


def examples_kind(examples: Sequence[Mapping[str, Any]]) -> str:
    """Validate in-memory examples the same way as files, and return their common kind."""
    if not examples:
        raise EvalSetError("empty eval set (no examples)")
    kinds = set()
    for i, ex in enumerate(examples):
        try:
            kinds.add(_validate_example(ex)[1])
        except EvalSetError as exc:
            raise EvalSetError(f"example {i}: {exc}") from None
    if len(kinds) > 1:
        raise EvalSetError("eval set mixes text and prompt/completion examples; use one kind")
    return kinds.pop()


def load_eval_sets(eval_sets: Mapping[str, PathLike]) -> dict[str, list[dict[str, str]]]:
    """Load every task's set up front, so a bad file fails before a model is loaded."""
    return {task: load_eval_set(path) for task, path in eval_sets.items()}


@dataclass(frozen=True)
class Encoded:
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


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(tokenizer: Any, example: Mapping[str, str], *, bos: list[int], eos: list[int]) -> Encoded:
    """Tokenize as documented in the module docstring: BOS? + context + scored tokens + EOS?."""
    if "text" in example:
        ids = bos + plain_ids(tokenizer, example["text"]) + eos
        return Encoded(ids=ids, n_context=1)
    prompt = bos + plain_ids(tokenizer, example["prompt"])
    if not prompt:
        raise EvalSetError(
            "an example has an empty prompt and the tokenizer adds no BOS token, so the first "
            "completion token has no context to be predicted from"
        )
    ids = prompt + plain_ids(tokenizer, example["completion"]) + eos
    return Encoded(ids=ids, n_context=len(prompt))


def special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos = [eos_id] if eos_id is not None else []
    return bos, eos


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
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


def pad_id(tokenizer: Any) -> int:
    """Any valid id works (padded positions are masked), but a real one keeps embeddings in range."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
