"""Progress as log lines (``metamerge.progress.report_to``): what a Prefect task run or a DVC stage
shows while the core works, and nothing (no bar) when no one asked."""

from __future__ import annotations

import re

from metamerge.progress import LineProgress, note, progress_bar, report_to

from models import run_merge


def test_a_bar_reports_each_tenth_once_then_nothing_without_a_sink(capsys):
    lines: list[str] = []
    with report_to(lines.append):
        bar = progress_bar(20, "work", enabled=False)
        assert isinstance(bar, LineProgress)
        with bar:
            for _ in range(20):
                bar.update(1)
        note(False, "phase two")
    assert lines == [f"work: {p}% ({p // 5} of 20)" for p in range(10, 101, 10)] + ["phase two"]
    with progress_bar(20, "quiet", enabled=False) as bar:  # no sink: a disabled tqdm, silent
        bar.update(20)
    note(False, "unseen")
    assert capsys.readouterr().err == ""


def test_big_steps_report_the_tenth_reached_and_sizes_are_readable():
    lines: list[str] = []
    with report_to(lines.append), progress_bar(4000, "merge", unit="B", unit_scale=True) as bar:
        bar.update(1000)   # 25%: the 20% line
        bar.update(2600)   # 90%
        bar.set_postfix(loss="0.5")
        bar.update(400)
    assert lines == ["merge: 20% (1.0 kB of 4.0 kB)", "merge: 90% (3.6 kB of 4.0 kB)",
                     "merge: 100% (4.0 kB of 4.0 kB), loss 0.5"]


def test_a_real_merge_reports_its_passes_to_the_sink(tiny_llama_fp32, tmp_path):
    """One progress over the whole merge (MetaGPT's norm units, then its merge units), in bytes."""
    from metamerge.executors import ExecutorConfig

    from models import load_state

    fam = tiny_llama_fp32
    lines: list[str] = []
    with report_to(lines.append):
        result = run_merge({"merge_method": "metagpt", "base_model": str(fam.base),
                            "models": [{"model": r} for r in fam.refs]}, tmp_path / "out",
                           unit_bytes=2048, executor=ExecutorConfig(n_workers=1), use_cache=False)
    merge_lines = [line for line in lines if line.startswith("merge: ")]
    norm_bytes = sum(t.numel() * t.element_size() for t in load_state(fam.base).values()) * (1 + len(fam.refs))
    total = result.plan.total_bytes + norm_bytes
    assert merge_lines[-1].startswith("merge: 100% (") and merge_lines[-1].endswith(f"of {total / 1000:.1f} kB)")
    percents = [int(re.match(r"merge: (\d+)%", line).group(1)) for line in merge_lines]
    assert percents == sorted(set(percents)) and len(percents) >= 3


def test_scenario_training_reports_every_tenth_with_its_loss():
    """The DVC scenario stage trains for minutes: each training run reports ten lines."""
    from scenarios.data import build_tokenizer, encode_examples
    from scenarios.sizes import SIZES
    from scenarios.training import new_model, train_model

    examples = [{"prompt": f"add {a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    tok = build_tokenizer(ex["prompt"] + ex["completion"] for ex in examples)
    model = new_model(tok, SIZES["tiny"], 0)
    lines: list[str] = []
    with report_to(lines.append):
        losses = train_model(model, encode_examples(tok, examples), steps=20, lr=1e-3, batch_size=4,
                             warmup_steps=2, seed=0, desc="ft-add", progress=False)
    assert [line.split(" (")[0] for line in lines] == [f"ft-add: {p}%" for p in range(10, 101, 10)]
    assert lines[-1] == f"ft-add: 100% (20 of 20), loss {losses[-1]:.3f}"
