"""Greedy decoding: one explicit argmax loop for every place that scores a model's answers.

Not ``model.generate``: ``generate`` merges the checkpoint's ``generation_config`` (repetition
penalties, suppressed tokens, sampling defaults), which would make "greedy" depend on what a
fine-tune shipped. Every exact-match score of the project comes from this loop, so all of them
agree on what a model answers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .device import model_device


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompts: Sequence[list[int]], *, max_new_tokens: int,
                  stop_ids: set[int], pad_id: int, device: torch.device | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids), cut before its first stop token.

    Prompts of different lengths are left-padded; position ids come from the attention mask, so
    padding does not shift positions and a padded row computes what it would alone.
    """
    device = device or model_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    accepts = inspect.signature(model.forward).parameters

    out_tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"position_ids": step_pos} if "position_ids" in accepts else {}
        if "logits_to_keep" in accepts:
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
