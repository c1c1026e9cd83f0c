"""Build the demo scenario: one small base model and four fine-tunes of it.

Merging only means something when there are models to merge that really differ
in what they can do. Downloading real checkpoints is not an option (offline,
CPU-only, must run in CI), so this module makes its own, from scratch and
deterministically: a character tokenizer, a ~1M-parameter Llama-style base
briefly trained on a mixture of the four skills (it knows the format but is
mediocre), and one full fine-tune of that base per skill (each good at its own
skill). Held-out evaluation sets and a manifest with the measured greedy
accuracy of every model on every skill go alongside.

Layout of ``out_dir``::

    scenario.json            manifest (see ScenarioManifest)
    base/                    float32 safetensors + tokenizer
    ft-<skill>/              one per skill, same architecture as base
    train/<skill>.jsonl      the fine-tuning data, for audit and disjointness checks
    eval/<skill>.jsonl       held-out {"prompt", "completion"} lines

Run as a stage: ``python -m metamerge.scenario.build OUT_DIR --size demo --seed 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from metamerge.scenario.skills import ALPHABET, SKILL_NAMES, Example, Skill, all_skills

#: Bumped whenever the recipe changes what a build produces, so an old cached
#: scenario is rebuilt instead of being silently reused.
FORMAT_VERSION = 1

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

#: ``(input_ids, labels, lengths)`` of a right-padded training set, see ``encode_examples``.
Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ScenarioSize:
    """Model shape and training budget of one scenario size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    train_per_task: int
    eval_per_task: int
    batch_size: int
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float
    finetune_lr: float
    warmup_steps: int
    #: torch CPU threads; results are bit-reproducible only for a fixed count.
    num_threads: int
    #: length-sorted pieces each batch is computed in (see _accumulate_gradients);
    #: pays off for the demo model, costs more per-op overhead than it saves for tiny.
    micro_batches: int


SIZES: dict[str, ScenarioSize] = {
    # ~0.9M parameters. Sized by the CPU budget (a few minutes on 2 cores for
    # the whole build): each fine-tune then gets ~0.95-1.0 on its own skill.
    # Eight heads rather than four, and two-digit addition, are what make
    # addition learnable in 300 steps at all.
    "demo": ScenarioSize(
        hidden_size=128,
        num_layers=4,
        num_heads=8,
        intermediate_size=384,
        train_per_task=12_000,
        eval_per_task=200,
        batch_size=64,
        pretrain_steps=300,
        finetune_steps=300,
        pretrain_lr=3e-3,
        # Low enough that fine-tunes stay near the base (smaller, less
        # conflicting task vectors to merge), high enough to learn addition.
        finetune_lr=5e-4,
        warmup_steps=30,
        num_threads=2,
        micro_batches=4,
    ),
    # For the test suite: too small to be good at anything, but each fine-tune
    # still beats the base on its own skill, which is what tests check. One
    # thread: matrices this small gain nothing from two, and a second thread
    # slows to a crawl when test processes share the cores.
    "tiny": ScenarioSize(
        hidden_size=64,
        num_layers=2,
        num_heads=8,
        intermediate_size=192,
        train_per_task=3_000,
        eval_per_task=100,
        batch_size=32,
        pretrain_steps=100,
        finetune_steps=300,
        pretrain_lr=3e-3,
        finetune_lr=5e-3,
        warmup_steps=15,
        num_threads=1,
        micro_batches=1,
    ),
}


@dataclass
class ScenarioManifest:
    """Where everything in a built scenario lies, and how good each model is.

    Paths are stored relative to the scenario directory in ``scenario.json`` (the
    build happens in a temporary directory that is renamed afterwards, and users
    may move it); ``load`` makes them absolute again.
    """

    root: Path
    size: str
    seed: int
    tasks: list[str]
    base: Path
    finetuned: dict[str, Path]
    eval_sets: dict[str, Path]
    train_sets: dict[str, Path]
    #: ``accuracy[model][task]``: greedy exact-match accuracy, model in {"base", "ft-<task>"}
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    build_seconds: float = 0.0
    num_parameters: int = 0
    #: everything that determines the build's output; a cached build is reused only if equal
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def models(self) -> dict[str, Path]:
        """Every model directory by name: ``base`` and ``ft-<task>``."""
        return {"base": self.base, **{f"ft-{task}": path for task, path in self.finetuned.items()}}

    def to_json(self) -> dict[str, Any]:
        def rel(path: Path) -> str:
            return Path(path).relative_to(self.root).as_posix()

        return {
            "format_version": self.format_version,
            "size": self.size,
            "seed": self.seed,
            "tasks": list(self.tasks),
            "base": rel(self.base),
            "finetuned": {t: rel(p) for t, p in self.finetuned.items()},
            "eval_sets": {t: rel(p) for t, p in self.eval_sets.items()},
            "train_sets": {t: rel(p) for t, p in self.train_sets.items()},
            "accuracy": self.accuracy,
            "build_seconds": self.build_seconds,
            "num_parameters": self.num_parameters,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, root: str | os.PathLike, data: dict[str, Any]) -> ScenarioManifest:
        root = Path(root).resolve()
        return cls(
            root=root,
            size=data["size"],
            seed=data["seed"],
            tasks=list(data["tasks"]),
            base=root / data["base"],
            finetuned={t: root / p for t, p in data["finetuned"].items()},
            eval_sets={t: root / p for t, p in data["eval_sets"].items()},
            train_sets={t: root / p for t, p in data["train_sets"].items()},
            accuracy=data.get("accuracy", {}),
            build_seconds=data.get("build_seconds", 0.0),
            num_parameters=data.get("num_parameters", 0),
            params=data.get("params", {}),
            format_version=data.get("format_version", 0),
        )

    @classmethod
    def load(cls, root: str | os.PathLike) -> ScenarioManifest:
        """Read ``root/scenario.json``."""
        root = Path(root)
        return cls.from_json(root, json.loads((root / "scenario.json").read_text()))


# --------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------- tokenizer


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


# -------------------------------------------------------------------------- model


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
    with _progress_bar(steps, desc, progress) as bar:
        for _ in range(steps):
            idx = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulate_gradients(model, input_ids[idx], labels[idx], lengths[idx], micro_batches)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
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

    Prompts are batched by token length so no batch needs padding: every row
    then starts at position 0, exactly as in training, with no masks. An
    explicit argmax loop rather than ``model.generate``, so that "greedy" cannot
    be changed by whatever ``generation_config`` a checkpoint carries.
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
            step_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            new_tokens = torch.empty((len(chunk), 0), dtype=torch.long)
            finished = torch.zeros(len(chunk), dtype=torch.bool)
            past = None
            for _ in range(max_new_tokens):
                out = model(input_ids=step_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                step_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                new_tokens = torch.cat([new_tokens, step_ids], dim=1)
                finished |= step_ids[:, 0] == eos
                if bool(finished.all()):
                    break
            for i, row in zip(chunk, new_tokens.tolist()):
                if eos in row:
                    row = row[: row.index(eos)]
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


# ---------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
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


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    # Only draw bars for a person watching: in CI logs and DVC runs they are noise.
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
            yield bar
    else:
        yield _NullBar()


def _log(progress: bool, message: str) -> None:
    if progress and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    # transformers draws a "Writing model shards" bar per save, even into logs;
    # the build has its own progress reporting, so switch it off meanwhile.
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.to(torch.float32).save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _build_params(size: str, seed: int) -> dict[str, Any]:
    """Everything that determines the build's output, compared to reuse a cache."""
    return {
        "format_version": FORMAT_VERSION,
        "size": size,
        "seed": seed,
        "tasks": list(SKILL_NAMES),
        "spec": dataclasses.asdict(SIZES[size]),
    }


def _cached(out_dir: Path, params: dict[str, Any]) -> ScenarioManifest | None:
    path = out_dir / "scenario.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("params") != params:
        return None
    manifest = ScenarioManifest.from_json(out_dir, data)
    needed = [manifest.base / "config.json"]
    needed += [p / "config.json" for p in manifest.finetuned.values()]
    needed += list(manifest.eval_sets.values()) + list(manifest.train_sets.values())
    return manifest if all(p.exists() for p in needed) else None


def _umask() -> int:
    # The only way to read the umask is to set it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished build into place, replacing whatever was there.

    ``os.replace`` cannot replace a non-empty directory, so an old one is first
    renamed aside; readers then see either the old or the new scenario, never
    a half-written one.
    """
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


# -------------------------------------------------------------------------- build


def build_scenario(
    out_dir: str | os.PathLike, *, size: str = "demo", seed: int = 0, progress: bool = True
) -> ScenarioManifest:
    """Build (or reuse) the scenario in ``out_dir`` and return its manifest.

    A complete scenario already in ``out_dir`` with the same parameters is
    returned as is; anything else there is replaced atomically once the new
    build has finished.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    out_dir = Path(out_dir).resolve()
    params = _build_params(size, seed)
    cached = _cached(out_dir, params)
    if cached is not None:
        _log(progress, f"scenario in {out_dir} is up to date")
        return cached

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # mkdtemp makes the directory private (0700); the scenario is not.
        os.chmod(tmp, 0o777 & ~_umask())
        with _deterministic(SIZES[size].num_threads):
            manifest = _build_into(tmp, SIZES[size], size=size, seed=seed, params=params, progress=progress)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ScenarioManifest.load(out_dir)


def _build_into(
    root: Path, spec: ScenarioSize, *, size: str, seed: int, params: dict[str, Any], progress: bool
) -> ScenarioManifest:
    started = time.perf_counter()
    skills = all_skills()
    train, evals = make_datasets(skills, seed, spec.train_per_task, spec.eval_per_task)
    for name in skills:
        write_jsonl(root / "train" / f"{name}.jsonl", train[name])
        write_jsonl(root / "eval" / f"{name}.jsonl", evals[name])

    tokenizer = build_tokenizer(ex["prompt"] + ex["completion"] for exs in train.values() for ex in exs)
    encoded = {name: encode_examples(tokenizer, train[name]) for name in skills}
    train_kwargs = dict(
        batch_size=spec.batch_size, warmup_steps=spec.warmup_steps, micro_batches=spec.micro_batches, progress=progress
    )

    _log(progress, f"pretraining base ({size})")
    base = new_model(tokenizer, spec, seed)
    train_model(
        base, _mixture(encoded.values(), tokenizer.pad_token_id), steps=spec.pretrain_steps, lr=spec.pretrain_lr,
        seed=seed, desc="base", **train_kwargs,
    )
    _save(base, tokenizer, root / "base")

    accuracy: dict[str, dict[str, float]] = {"base": _evaluate(base, tokenizer, evals, skills)}
    finetuned: dict[str, Path] = {}
    for name in skills:
        _log(progress, f"fine-tuning on {name}")
        model = copy.deepcopy(base)
        # Same hyper-parameters and batch-order seed for every skill: the
        # fine-tunes then differ only in their data, as merging assumes.
        train_model(
            model, encoded[name], steps=spec.finetune_steps, lr=spec.finetune_lr,
            seed=seed + 1, desc=f"ft-{name}", **train_kwargs,
        )
        finetuned[name] = root / f"ft-{name}"
        _save(model, tokenizer, finetuned[name])
        accuracy[f"ft-{name}"] = _evaluate(model, tokenizer, evals, skills)
        del model

    manifest = ScenarioManifest(
        root=root,
        size=size,
        seed=seed,
        tasks=list(skills),
        base=root / "base",
        finetuned=finetuned,
        eval_sets={name: root / "eval" / f"{name}.jsonl" for name in skills},
        train_sets={name: root / "train" / f"{name}.jsonl" for name in skills},
        accuracy=accuracy,
        build_seconds=round(time.perf_counter() - started, 2),
        num_parameters=sum(p.numel() for p in base.parameters()),
        params=params,
    )
    # Written last: its presence is what marks a build as complete.
    (root / "scenario.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def _mixture(parts: Iterable[Encoded], pad_id: int) -> Encoded:
    """Concatenate several encoded datasets, padding them to a common width."""
    parts = list(parts)
    width = max(ids.shape[1] for ids, _, _ in parts)

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([widen(i, pad_id) for i, _, _ in parts])
    labels = torch.cat([widen(lab, -100) for _, lab, _ in parts])
    lengths = torch.cat([n for _, _, n in parts])
    return ids, labels, lengths


def _evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, evals: dict[str, list[Example]], skills: dict[str, Skill]
) -> dict[str, float]:
    return {name: round(greedy_accuracy(model, tokenizer, evals[name], skills[name]), 4) for name in skills}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the demo scenario: base model, fine-tunes, eval sets.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="never draw progress bars")
    args = parser.parse_args(argv)
    manifest = build_scenario(args.out_dir, size=args.size, seed=args.seed, progress=not args.no_progress)
    summary = {
        "out_dir": str(manifest.root),
        "build_seconds": manifest.build_seconds,
        "num_parameters": manifest.num_parameters,
        "accuracy": manifest.accuracy,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
