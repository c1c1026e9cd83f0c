"""Training the scenario's models, and measuring them: a Llama-style model, AdamW, greedy accuracy.

Deterministic on purpose: a fixed thread count, deterministic kernels and a private batch-order
generator make a build bit-reproducible on one machine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from metamerge.greedy import greedy_decode
from metamerge.progress import progress_bar

from .data import Encoded
from .sizes import ScenarioSize
from .skills import Example, Skill


def new_model(tokenizer: PreTrainedTokenizerFast, size: ScenarioSize, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama-style causal LM sized from the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        # Untied so embedding and output layers are separate tensors that a
        # merge method can treat independently.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = None
    gen.do_sample = False
    gen.max_new_tokens = 16
    return model


def train_model(
    model: PreTrainedModel,
    data: Encoded,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup_steps: int,
    seed: int,
    desc: str,
    progress: bool,
    micro_batches: int = 1,
) -> list[float]:
    """Train in place with AdamW and a warmup-then-cosine schedule; returns losses.

    Batches are drawn by a private generator seeded from ``seed``, so the batch
    order -- the only randomness in training, Llama has no dropout -- is fixed.
    """
    input_ids, labels, lengths = data
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    batches = _random_batches(len(input_ids), batch_size, gen)
    with progress_bar(steps, desc, progress) as bar:
        for _ in range(steps):
            idx = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulate_gradients(model, input_ids[idx], labels[idx], lengths[idx], micro_batches)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # first: a progress line shows this step's loss
            bar.update(1)
    model.eval()
    return losses


def _random_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of row indices: epochs of a fresh permutation each."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _accumulate_gradients(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, micro_batches: int
) -> float:
    """Backpropagate the batch's mean loss over labelled tokens; return that loss.

    A batch of the skill mixture pads every row to its longest (lookup) row,
    doubling the compute. Splitting it by length into micro-batches, each trimmed
    to its own longest row, computes the same loss and gradient as the whole
    batch at once for about half the cost. (Sampling batches grouped by length
    would be cheaper still, but makes batches single-skill and pretraining then
    learns far less per step.)
    """
    order = torch.argsort(lengths, stable=True)
    total_tokens = int((labels[:, 1:] != -100).sum())
    total = 0.0
    for piece in torch.tensor_split(order, micro_batches):
        if len(piece) == 0:
            continue
        width = int(lengths[piece].max())
        # No attention mask needed: padding is only at the right, and causal
        # attention never lets a real token see what comes after it.
        logits = model(input_ids=input_ids[piece, :width]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[piece, 1:width].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ) / total_tokens
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions of ``prompts``, cut at the first end-of-sequence token.

    Prompts are batched by token length so no batch needs padding: every row then starts at
    position 0, exactly as in training. The loop is the core's (``metamerge.greedy``), the one the
    evaluation's exact match uses too.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    outputs: list[str] = [""] * len(prompts)
    for length in sorted(by_length):
        members = by_length[length]
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            rows = greedy_decode(model, [encoded[i] for i in chunk], max_new_tokens=max_new_tokens,
                                 stop_ids={eos}, pad_id=tokenizer.pad_token_id)
            for i, row in zip(chunk, rows):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
    return outputs


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    skill: Skill,
    batch_size: int = 256,
) -> float:
    """Fraction of ``examples`` whose greedy completion ``skill.score`` accepts."""
    if not examples:
        return 0.0
    # Room for the longest reference plus one token, so an over-long answer is
    # visible as wrong rather than truncated into a right one.
    longest = max(len(tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]) for ex in examples)
    predictions = greedy_generate(
        model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens=longest + 2, batch_size=batch_size
    )
    correct = sum(skill.score(pred, ex["completion"]) for pred, ex in zip(predictions, examples))
    return correct / len(examples)


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fix thread count, deterministic kernels and the global torch RNG, then restore them.

    The build is a library call inside longer-lived processes (flows, tests), so
    it must not leave torch configured differently from how it found it.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)

