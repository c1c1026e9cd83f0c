"""The demo scenario: skills are generated and scored exactly, and a tiny build learns.

The build test is the expensive one (a tiny model trained from scratch, ~20 s);
it runs once per session and every build assertion shares it.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from scenarios.skills import (
    ALPHABET,
    SKILL_NAMES,
    Addition,
    Lookup,
    Reverse,
    Sort,
    all_skills,
    exact_match,
    get_skill,
    make_lexicon,
)

# ------------------------------------------------------------------ skills


def test_addition_completions_are_the_sums():
    examples = Addition().generate(random.Random(0), 300)
    for ex in examples:
        match = re.fullmatch(r"add (\d+)\+(\d+)=", ex["prompt"])
        assert match, ex
        a, b = match.groups()
        assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3 and not a.startswith("0") and not b.startswith("0")
        assert ex["completion"] == str(int(a) + int(b))


def test_hand_written_answers():
    assert Addition().example("47+385") == {"prompt": "add 47+385=", "completion": "432"}
    assert Reverse().example("abc") == {"prompt": "rev abc=", "completion": "cba"}
    assert Sort().example("dbca") == {"prompt": "sort dbca=", "completion": "abcd"}
    assert Sort().answer("banana") == "aaabnn"
    lookup = Lookup(table={"kel": "tor", "vas": "mip"})
    assert lookup.example("kel vas kel") == {"prompt": "map kel vas kel=", "completion": "tor mip tor"}


def test_reverse_and_sort_examples_are_consistent():
    for ex in Reverse().generate(random.Random(1), 200):
        word = ex["prompt"].removeprefix("rev ").removesuffix("=")
        assert 3 <= len(word) <= 6 and word.isalpha() and ex["completion"] == word[::-1]
    for ex in Sort().generate(random.Random(1), 200):
        word = ex["prompt"].removeprefix("sort ").removesuffix("=")
        assert sorted(ex["completion"]) == sorted(word) and list(ex["completion"]) == sorted(word)


def test_lexicon_is_fixed_and_unambiguous():
    table = make_lexicon()
    assert table == make_lexicon() and len(table) == 30
    words = list(table) + list(table.values())
    assert len(set(words)) == len(words)  # no word is both a source and a target, or repeated
    for ex in Lookup().generate(random.Random(2), 200):
        sources = ex["prompt"].removeprefix("map ").removesuffix("=").split(" ")
        assert 1 <= len(sources) <= 3
        assert ex["completion"].split(" ") == [table[w] for w in sources]


def test_scoring_is_exact_match_after_strip():
    skill = get_skill("addition")
    assert skill.score("432", "432")
    assert skill.score(" 432\n", "432")
    assert not skill.score("431", "432")
    assert not skill.score("4320", "432")
    assert not skill.score("", "432")
    assert exact_match("cba ", "cba") and not exact_match("cb a", "cba")


def test_generation_is_deterministic_and_seed_dependent():
    for name, skill in all_skills().items():
        first = skill.generate(random.Random(7), 50)
        assert first == skill.generate(random.Random(7), 50), name
        assert first != skill.generate(random.Random(8), 50), name


def test_prompts_are_short_and_within_the_alphabet():
    for skill in all_skills().values():
        for ex in skill.generate(random.Random(3), 300):
            assert ex["prompt"].startswith(skill.prefix + " ") and ex["prompt"].endswith("=")
            assert len(ex["prompt"]) < 24
            assert set(ex["prompt"] + ex["completion"]) <= set(ALPHABET)


def test_unknown_skill_names_are_rejected():
    assert list(all_skills()) == list(SKILL_NAMES)
    with pytest.raises(KeyError, match="addition"):
        get_skill("division")


# ------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def tiny(tiny_scenario):
    return tiny_scenario


def test_tiny_build_writes_every_artifact(tiny):
    root = tiny.root
    assert (root / "scenario.json").is_file()
    assert tiny.tasks == list(SKILL_NAMES)
    for path in tiny.models.values():
        assert (path / "config.json").is_file()
        assert (path / "model.safetensors").is_file()
        assert (path / "tokenizer.json").is_file()
    # nothing left behind by the atomic rename
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_tiny_models_reload_with_auto_classes(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scenarios.data import read_jsonl
    from scenarios.training import greedy_accuracy

    for path in tiny.models.values():
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.tie_word_embeddings is False
        assert model.config.vocab_size == len(tokenizer)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert tokenizer.decode(tokenizer("add 12+34=", add_special_tokens=False)["input_ids"]) == "add 12+34="
    # the reloaded fine-tune scores exactly what the manifest recorded for it
    task = "sort"
    model = AutoModelForCausalLM.from_pretrained(tiny.finetuned[task])
    tokenizer = AutoTokenizer.from_pretrained(tiny.finetuned[task])
    acc = greedy_accuracy(model, tokenizer, read_jsonl(tiny.eval_sets[task]), get_skill(task))
    assert acc == pytest.approx(tiny.accuracy[f"ft-{task}"][task], abs=1e-4)


def test_tiny_eval_sets_are_valid_and_held_out(tiny):
    for task in SKILL_NAMES:
        skill = get_skill(task)
        lines = tiny.eval_sets[task].read_text().splitlines()
        evals = [json.loads(line) for line in lines]
        assert evals and all(set(ex) == {"prompt", "completion"} for ex in evals)
        assert all(skill.answer(ex["prompt"][len(skill.prefix) + 1 : -1]) == ex["completion"] for ex in evals)
        prompts = [ex["prompt"] for ex in evals]
        train = {json.loads(line)["prompt"] for line in tiny.train_sets[task].read_text().splitlines()}
        assert len(set(prompts)) == len(prompts)
        assert not set(prompts) & train


def test_each_tiny_finetune_beats_the_base_on_its_own_task(tiny):
    data = json.loads((tiny.root / "scenario.json").read_text())
    acc = data["accuracy"]
    assert set(acc) == {"base", *(f"ft-{t}" for t in SKILL_NAMES)}
    for task in SKILL_NAMES:
        assert acc[f"ft-{task}"][task] > acc["base"][task], (task, acc)
    assert data["size"] == "tiny" and data["seed"] == 0 and "build_seconds" not in data  # no time in a DVC output


def test_rebuild_with_same_parameters_is_a_cache_hit(tiny):
    from scenarios.build import build_scenario

    stamp = (tiny.root / "scenario.json").stat().st_mtime_ns
    again = build_scenario(tiny.root, size="tiny", seed=0, progress=False)
    assert again.accuracy == tiny.accuracy
    assert (tiny.root / "scenario.json").stat().st_mtime_ns == stamp


def test_training_is_deterministic_for_a_seed():
    """Same seed, same weights: what makes a rebuilt scenario byte-identical."""
    import dataclasses

    import torch

    from scenarios.data import build_tokenizer, encode_examples
    from scenarios.sizes import SIZES
    from scenarios.training import deterministic, new_model, train_model

    spec = dataclasses.replace(SIZES["tiny"], hidden_size=16, num_heads=2, intermediate_size=32, num_layers=1)
    examples = get_skill("reverse").generate(random.Random(0), 64)
    tokenizer = build_tokenizer(ex["prompt"] + ex["completion"] for ex in examples)
    data = encode_examples(tokenizer, examples)

    def trained(seed: int) -> dict[str, torch.Tensor]:
        with deterministic(spec.num_threads):
            model = new_model(tokenizer, spec, seed)
            train_model(model, data, steps=3, lr=1e-3, batch_size=8, warmup_steps=1, seed=seed, desc="", progress=False)
        return model.state_dict()

    first, again, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_cli_reuses_the_cached_build_and_other_parameters_do_not_match(tiny, capsys):
    from scenarios.build import _build_params, _cached, main

    assert main([str(tiny.root), "--size", "tiny", "--seed", "0", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy"] == tiny.accuracy
    assert _cached(tiny.root, _build_params("tiny", 0)) is not None
    assert _cached(tiny.root, _build_params("tiny", 1)) is None
    assert _cached(tiny.root, _build_params("demo", 0)) is None


def test_package_exports_build_lazily():
    import scenarios as scenario

    assert scenario.get_skill("sort").answer("cab") == "abc"
    assert callable(scenario.build_scenario) and scenario.ScenarioManifest.__name__ == "ScenarioManifest"
