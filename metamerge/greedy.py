"""Greedy decoding: one function for every place that scores a model's answers.

``model.generate`` with an explicit greedy ``GenerationConfig`` (:func:`greedy_config`), rather than
a hand-written argmax loop. Explicit because ``generate`` fills every field the given config leaves
unset (``None``) from the checkpoint's own ``generation_config.json``: a fine-tune that ships
``repetition_penalty: 1.3``, ``no_repeat_ngram_size``, ``suppress_tokens``, ``bad_words_ids`` or
``min_new_tokens`` would otherwise change what "greedy" means for that model alone. So while it
decodes, the model's ``generation_config`` is a pristine ``GenerationConfig()`` (restored after):
everything not set here takes transformers' neutral default, and every exact-match score of the
project (evaluation, the scenario's accuracy) asks every model the same question.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .device import model_device


def greedy_config(*, max_new_tokens: int, stop_ids: set[int], pad_id: int):
    """A ``GenerationConfig`` that is plain greedy search whatever the checkpoint ships."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            eos_token_id=sorted(stop_ids), pad_token_id=pad_id, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, use_cache=True, return_dict_in_generate=False)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompts: Sequence[list[int]], *, max_new_tokens: int,
                  stop_ids: set[int], pad_id: int, device: torch.device | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids), cut before its first stop token.

    Prompts of different lengths are left-padded with an attention mask (``generate`` derives the
    position ids from it), so a padded row computes what it would alone.
    """
    device = device or model_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    from transformers import GenerationConfig

    config = greedy_config(max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)
    lm: Any = model  # a transformers generative model (torch's Module type knows no generate)
    shipped = lm.generation_config
    lm.generation_config = GenerationConfig()  # nothing of the checkpoint's fills the gaps
    try:
        out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        lm.generation_config = shipped
    tokens: list[list[int]] = []
    for row in out[:, width:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stop_ids), len(row))
        tokens.append(row[:cut])
    return tokens
