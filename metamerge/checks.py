"""Checks that run on headers only, before any tensor is read, and plan the output.

Every model must have the base's tensor names and shapes. The one tolerated difference is a
vocabulary that grew (rows of the embedding / lm_head), and only under an explicit policy:
``truncate`` (mergekit's behaviour: keep the reference's rows) or ``extend`` (merge the shared
rows, take the extra rows from the fine-tune that has them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import MergeError
from .io import ModelReader
from .methods.params import ParamScope
from .shapes import nbytes

VOCAB_TENSOR = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|output)\.weight$")
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
               "embed_tokens.weight", "wte.weight")


@dataclass(frozen=True)
class TensorSource:
    """Where one output tensor is read from when it is not the same name in every model (slices).

    ``base`` and ``inputs`` are ``(index into Inputs.pool, tensor name in that model)``; ``inputs``
    are the method's entries in order, ``members`` their indices in the report's model list, and
    ``scope`` says how their parameters resolve (``methods.params.ParamScope``).
    """

    base: tuple[int, str] | None
    inputs: tuple[tuple[int, str], ...]
    members: tuple[int, ...]
    scope: ParamScope | None  # None: the recipe's own parameters at the tensor's layer


@dataclass
class Plan:
    """What the merge will write: tensors in order, their output shapes and dtypes."""

    names: list[str]
    out_shapes: dict[str, tuple[int, ...]]
    out_dtypes: dict[str, torch.dtype]
    shared_rows: dict[str, int] = field(default_factory=dict)  # vocab tensors: rows merged
    extend_from: int | None = None        # index of the model whose extra rows are taken
    aliases: dict[str, str] = field(default_factory=dict)      # tied name -> the name it copies
    vocab_size: int | None = None
    sources: dict[str, TensorSource] = field(default_factory=dict)  # slices: each tensor's inputs
    config_updates: dict = field(default_factory=dict)  # slices: layer count (and per-layer lists)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes(self.out_shapes[n], self.out_dtypes[n]) for n in self.names)


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))


def plan_merge(ref: ModelReader, others: list[ModelReader], *, vocab_policy: str,
               out_dtype: torch.dtype | None, cast_dtype: torch.dtype | None) -> Plan:
    """Compare headers, decide the output layout, and fail early with a one-line error."""
    names = sorted(ref.names())  # mergekit's order: it fixes the DARE random stream
    ref_set = set(names)
    plan = Plan(names=names, out_shapes={}, out_dtypes={})
    for other in others:
        theirs = set(other.names())
        missing = sorted(ref_set - theirs)
        extra = sorted(theirs - ref_set)
        if missing:
            raise MergeError(f"{other.label}: tensor '{missing[0]}' of {ref.label} is missing "
                             f"({len(missing)} missing in all); models must share one architecture")
        if extra:
            raise MergeError(f"{other.label}: has tensor '{extra[0]}' that {ref.label} lacks "
                             f"({len(extra)} extra in all); models must share one architecture")
    for name in names:
        info = ref.tensors[name]
        if not info.dtype.is_floating_point:
            raise MergeError(f"{ref.label}: tensor '{name}' is {info.dtype}; only floating-point weights can be merged")
        shapes = [o.tensors[name].shape for o in others]
        out_shape = info.shape
        if any(s != info.shape for s in shapes):
            bad = next(i for i, s in enumerate(shapes) if s != info.shape)
            rows_only = all(s[1:] == info.shape[1:] for s in shapes) and VOCAB_TENSOR.search(name)
            if not rows_only:
                raise MergeError(f"{others[bad].label}: tensor '{name}' has shape {list(shapes[bad])}, "
                                 f"{ref.label} has {list(info.shape)}; models must share one architecture")
            if vocab_policy == "error":
                raise MergeError(f"{others[bad].label}: vocabulary size differs on '{name}' "
                                 f"({shapes[bad][0]} rows vs {info.shape[0]} in {ref.label}); set "
                                 "vocab_policy: truncate or extend in the recipe (see README)")
            short = next((i for i, s in enumerate(shapes) if s[0] < info.shape[0]), None)
            if short is not None:
                raise MergeError(f"{others[short].label}: '{name}' has fewer rows ({shapes[short][0]}) than "
                                 f"{ref.label} ({info.shape[0]}); use that model's vocabulary as the base")
            plan.shared_rows[name] = info.shape[0]
            if vocab_policy == "extend":
                rows = [s[0] for s in shapes]
                biggest = max(rows)
                if plan.extend_from is None:
                    plan.extend_from = rows.index(biggest)
                elif rows[plan.extend_from] != biggest:
                    raise MergeError(f"{name}: two fine-tunes grew the vocabulary differently; "
                                     "extend takes the extra rows from one model only")
                out_shape = (biggest,) + info.shape[1:]
                plan.vocab_size = biggest
        plan.out_shapes[name] = out_shape
        plan.out_dtypes[name] = out_dtype or cast_dtype or info.dtype
    if _tied(ref.config()):
        head = next((n for n in LM_HEAD_NAMES if n in ref_set), None)
        emb = next((n for n in EMBED_NAMES if n in ref_set), None)
        if head and emb:
            # Tied: merge the embedding once and write the same tensor again right after it.
            plan.aliases[head] = emb
            plan.names = [n for n in plan.names if n != head]
            plan.names.insert(plan.names.index(emb) + 1, head)
    return plan
