"""The scenario's data: training and held-out sets per skill, the character tokenizer, and encoding.

Every draw comes from a ``random.Random`` seeded by (seed, purpose, skill), so the sets are the
same on every machine and Python version.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .skills import ALPHABET, Example, Skill

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


#: ``(input_ids, labels, lengths)`` of a right-padded training set, see ``encode_examples``.
Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]



def _rng(seed: int, purpose: str, task: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so each (seed, purpose,
    # task) gets an independent stream that is stable across Python versions.
    return random.Random(f"metamerge-scenario/{seed}/{purpose}/{task}")


def make_datasets(
    skills: dict[str, Skill], seed: int, train_per_task: int, eval_per_task: int
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Training sets and held-out evaluation sets for every skill.

    Evaluation examples come from a separate rng stream and any prompt also seen
    in training is dropped, so accuracy measures generalisation, not recall of a
    training example.
    """
    train: dict[str, list[Example]] = {}
    evals: dict[str, list[Example]] = {}
    for name, skill in skills.items():
        train[name] = skill.generate(_rng(seed, "train", name), train_per_task)
        seen = {ex["prompt"] for ex in train[name]}
        rng = _rng(seed, "eval", name)
        held_out: list[Example] = []
        for _ in range(1000 * eval_per_task):  # bound the loop should a skill's prompt space run out
            if len(held_out) == eval_per_task:
                break
            (ex,) = skill.generate(rng, 1)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                held_out.append(ex)
        else:
            raise RuntimeError(f"could not draw {eval_per_task} unseen {name} prompts")
        evals[name] = held_out
    return train, evals


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex["prompt"], "completion": ex["completion"]}) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train a character-level tokenizer on ``texts`` (plus the full alphabet).

    One token per character keeps every skill's structure visible to a tiny
    model (digits and letters line up with positions) and makes tokenising a
    prompt and its completion separately identical to tokenising them together.
    The alphabet is always added so the vocabulary never depends on which
    characters happen to appear in a sample.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(
        vocab_size=len(ALPHABET) + 3, min_frequency=1, special_tokens=[PAD, EOS, UNK], show_progress=False
    )
    tok.train_from_iterator(_chain_alphabet(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=64
    )


def _chain_alphabet(texts: Iterable[str]) -> Iterator[str]:
    yield ALPHABET
    yield from texts


def encode_examples(tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]) -> Encoded:
    """Right-padded ``input_ids``, ``labels`` and lengths for causal-LM training.

    Labels cover only the completion and the end-of-sequence token: the model is
    graded on answering, not on predicting random prompt inputs it cannot know.
    """
    # The backend's batch call: the Python wrapper's batching is several times slower.
    backend = tokenizer.backend_tokenizer
    prompts = [e.ids for e in backend.encode_batch([ex["prompt"] for ex in examples], add_special_tokens=False)]
    answers = [e.ids for e in backend.encode_batch([ex["completion"] for ex in examples], add_special_tokens=False)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
    ids_rows, label_rows, lengths_list = [], [], []
    for prompt, answer in zip(prompts, answers):
        answer = answer + [eos]
        filler = width - len(prompt) - len(answer)
        ids_rows.append(prompt + answer + [pad] * filler)
        label_rows.append([-100] * len(prompt) + answer + [-100] * filler)
        lengths_list.append(len(prompt) + len(answer))
    input_ids = torch.tensor(ids_rows, dtype=torch.long)
    labels = torch.tensor(label_rows, dtype=torch.long)
    lengths = torch.tensor(lengths_list, dtype=torch.long)
    return input_ids, labels, lengths

