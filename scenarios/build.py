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

The pieces: ``sizes`` (shapes and budgets), ``data`` (sets, tokenizer), ``training`` (models,
training, greedy accuracy), ``manifest`` (``scenario.json``); this module puts them together.

Run it alone: ``python -m scenarios.build OUT_DIR --size demo --seed 0``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from metamerge.atomic import atomic_directory
from metamerge.progress import note

from .data import Encoded, build_tokenizer, encode_examples, make_datasets, write_jsonl
from .manifest import FORMAT_VERSION, ScenarioManifest
from .sizes import LORA_SIZES, SIZES, ScenarioSize
from .skills import ADAPTER_SKILL_NAMES, LORA_BASE_SKILL_NAMES, SKILL_NAMES, Example, Skill, all_skills
from .training import deterministic, greedy_accuracy, new_model, train_model


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


#: The scenarios: ``skills`` (full fine-tunes of a briefly pretrained base) and ``lora`` (LoRA
#: adapters of a base pretrained longer, teaching skills it lacks; see ``scenarios.lora``).
SCENARIOS = ("skills", "lora")


def _build_params(size: str, seed: int, scenario: str = "skills") -> dict[str, Any]:
    """Everything that determines the build's output, compared to reuse a cache."""
    if scenario == "lora":
        return {"format_version": FORMAT_VERSION, "scenario": "lora", "size": size, "seed": seed,
                "pretrain_tasks": list(LORA_BASE_SKILL_NAMES), "tasks": list(ADAPTER_SKILL_NAMES),
                # as scenario.json holds it (tuples become lists), or the cache would never match
                "spec": json.loads(json.dumps(dataclasses.asdict(LORA_SIZES[size])))}
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
    needed += [p / ("adapter_config.json" if manifest.adapters else "config.json") for p in manifest.finetuned.values()]
    needed += list(manifest.eval_sets.values()) + list(manifest.train_sets.values())
    return manifest if all(p.exists() for p in needed) else None


def build_scenario(
    out_dir: str | os.PathLike, *, size: str = "demo", seed: int = 0, progress: bool = True,
    scenario: str = "skills",
) -> ScenarioManifest:
    """Build (or reuse) the scenario (``skills`` or ``lora``) in ``out_dir`` and return its manifest.

    A complete scenario already in ``out_dir`` with the same parameters is
    returned as is; anything else there is replaced atomically once the new
    build has finished.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {list(SCENARIOS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    out_dir = Path(out_dir).resolve()
    params = _build_params(size, seed, scenario)
    cached = _cached(out_dir, params)
    if cached is not None:
        note(progress, f"scenario in {out_dir} is up to date")
        return cached

    # built in a hidden sibling, renamed into place when complete: readers see the old scenario or
    # the new one, never half of one
    with atomic_directory(out_dir, overwrite=True) as tmp:
        if scenario == "lora":
            from .lora import build_lora_into

            with deterministic(LORA_SIZES[size].model.num_threads):
                build_lora_into(tmp, out_dir, LORA_SIZES[size], size=size, seed=seed, params=params,
                                progress=progress)
        else:
            with deterministic(SIZES[size].num_threads):
                _build_into(tmp, SIZES[size], size=size, seed=seed, params=params, progress=progress)
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

    note(progress, f"pretraining base ({size})")
    base = new_model(tokenizer, spec, seed)
    train_model(
        base, _mixture(encoded.values(), tokenizer.pad_token_id), steps=spec.pretrain_steps, lr=spec.pretrain_lr,
        seed=seed, desc="base", **train_kwargs,
    )
    _save(base, tokenizer, root / "base")

    accuracy: dict[str, dict[str, float]] = {"base": _evaluate(base, tokenizer, evals, skills)}
    finetuned: dict[str, Path] = {}
    for name in skills:
        note(progress, f"fine-tuning on {name}")
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
    parser = argparse.ArgumentParser(prog="python -m scenarios.build",
                                     description="Build the demo scenario: base model, fine-tunes, eval sets.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenario", choices=SCENARIOS, default="skills",
                        help="skills: full fine-tunes (default); lora: LoRA adapters of a longer-pretrained base")
    parser.add_argument("--no-progress", action="store_true", help="never draw progress bars")
    args = parser.parse_args(argv)
    manifest = build_scenario(args.out_dir, size=args.size, seed=args.seed, progress=not args.no_progress,
                              scenario=args.scenario)
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
