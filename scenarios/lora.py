"""The ``lora`` scenario: a base pretrained longer on related skills, and one PEFT LoRA adapter per
new skill: the regime of the MetaGPT paper (a pretrained model, small task vectors).

The ``skills`` scenario's fine-tunes move far from a briefly pretrained base, where the paper's
assumptions fail, and so did adapters that taught this base operations it had never done (new
rules, a table read backwards): their outputs moved far from linear and no merge kept them. Here
the base is pretrained longer on six operations, each under its own prompt word (addition,
reversal, sorting, lookup, copying, sorting downwards; ``skills.LORA_BASE_SKILL_NAMES``), and each
adapter (rank 8, B starting at zero) teaches in a few hundred steps a *new prompt word* for one
word operation it already does well: ``flip`` for reversal, ``ord`` for sorting, ``echo`` for
copying, ``down`` for sorting downwards (``skills.ADAPTER_SKILL_NAMES``). The base lacks each
skill only by its trigger (it guesses among the operations it knows and is rarely right), so the
update is small, local to its word and distinct per skill.

Layout of ``out_dir`` as the ``skills`` scenario's, with adapter folders for the fine-tunes::

    base/                    float32 safetensors + tokenizer
    lora-<skill>/            adapter_config.json + adapter_model.safetensors (+ the tokenizer,
                             which evaluation loads)
    train/, eval/, scenario.json

Each adapter's ``base_model_name_or_path`` is the base's final absolute path (``out_dir/base``).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from metamerge.progress import note

from .data import build_tokenizer, encode_examples, make_datasets, write_jsonl
from .manifest import ScenarioManifest
from .sizes import LoraScenarioSize
from .skills import ADAPTER_SKILL_NAMES, LORA_BASE_SKILL_NAMES, all_skills
from .training import new_model, train_model


def build_lora_into(root: Path, final_root: Path, spec: LoraScenarioSize, *, size: str, seed: int,
                    params: dict[str, Any], progress: bool) -> ScenarioManifest:
    """Build into ``root`` (a staging folder that becomes ``final_root``)."""
    from peft import LoraConfig, get_peft_model

    from .build import _evaluate, _mixture, _save

    started = time.perf_counter()
    model_spec = spec.model
    pretrain = all_skills(LORA_BASE_SKILL_NAMES)
    skills = all_skills(ADAPTER_SKILL_NAMES)
    pre_train, _ = make_datasets(pretrain, seed, model_spec.train_per_task, 1)  # its eval sets unused
    train, evals = make_datasets(skills, seed, model_spec.train_per_task, model_spec.eval_per_task)
    for name in skills:
        write_jsonl(root / "train" / f"{name}.jsonl", train[name])
        write_jsonl(root / "eval" / f"{name}.jsonl", evals[name])

    texts = [ex["prompt"] + ex["completion"] for sets in (pre_train, train) for exs in sets.values() for ex in exs]
    tokenizer = build_tokenizer(texts)
    train_kwargs = dict(batch_size=model_spec.batch_size, warmup_steps=model_spec.warmup_steps,
                        micro_batches=model_spec.micro_batches, progress=progress)

    note(progress, f"pretraining base ({size}) on {', '.join(pretrain)}")
    base = new_model(tokenizer, model_spec, seed)
    mixture = _mixture([encode_examples(tokenizer, exs) for exs in pre_train.values()], tokenizer.pad_token_id)
    train_model(base, mixture, steps=model_spec.pretrain_steps, lr=model_spec.pretrain_lr, seed=seed,
                desc="base", **train_kwargs)
    _save(base, tokenizer, root / "base")

    accuracy: dict[str, dict[str, float]] = {"base": _evaluate(base, tokenizer, evals, skills)}
    adapters: dict[str, Path] = {}
    for name in skills:
        note(progress, f"LoRA adapter for {name}")
        config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        # the same seed for every adapter (PEFT draws A from the global generator), as the same
        # batch-order seed: adapters differ only in their data
        torch.manual_seed(seed + 1)
        model = get_peft_model(copy.deepcopy(base), config)
        train_model(model, encode_examples(tokenizer, train[name]), steps=model_spec.finetune_steps,
                    lr=model_spec.finetune_lr, seed=seed + 1, desc=f"lora-{name}", **train_kwargs)
        # what PEFT records when the base is loaded from where it will lie
        model.peft_config["default"].base_model_name_or_path = str(final_root / "base")
        adapters[name] = root / f"lora-{name}"
        model.save_pretrained(adapters[name], save_embedding_layers=False)  # only the LoRA factors
        tokenizer.save_pretrained(adapters[name])
        accuracy[f"ft-{name}"] = _evaluate(model.merge_and_unload(), tokenizer, evals, skills)
        del model

    manifest = ScenarioManifest(
        root=root, size=size, seed=seed, tasks=list(skills), base=root / "base", finetuned=adapters,
        eval_sets={name: root / "eval" / f"{name}.jsonl" for name in skills},
        train_sets={name: root / "train" / f"{name}.jsonl" for name in skills},
        accuracy=accuracy, build_seconds=round(time.perf_counter() - started, 2),
        num_parameters=sum(p.numel() for p in base.parameters()), params=params, adapters=True)
    (root / "scenario.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
