"""``metamerge.estimate``: the dry run's cost figures against the README benchmark's measurements.

The benchmark's 1B layout (bf16, hidden 2048, 16 layers, vocab 32000, base + 3 fine-tunes) is
written as real safetensors files whose headers are complete and whose data is a sparse hole (no
disk used): the estimate reads headers only, as ``--dry-run`` does. The measured figures are the
README's scale-out table (2-core machine, 2 workers): metagpt 11.5 s / 0.59 GiB with an empty cache,
8.2 s with its norms cached; task_arithmetic 9.8-12.6 s (median 10.2 s).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from metamerge.engine import MergeOptions
from metamerge.estimate import STARTUP_S, estimate_recipe
from metamerge.executors import ExecutorConfig
from metamerge.recipe import parse_recipe

GiB = 1 << 30
TWO_WORKERS = MergeOptions(executor=ExecutorConfig(n_workers=2))


def _sparse_model(folder, config) -> int:
    """A header-complete safetensors file of ``config``'s Llama in bf16, its data a hole; its bytes."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
    header, offset = {}, 0
    for name in sorted(shapes):
        size = 2 * int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    config.to_json_file(folder / "config.json")
    return offset


@pytest.fixture(scope="module")
def one_billion(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("1b")
    sizes = {name: _sparse_model(root / name, config) for name in ("base", "ft0", "ft1", "ft2")}
    return root, sizes


def _recipe(root, method, **params):
    return parse_recipe({"merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
                         "out_dtype": "bfloat16", "parameters": params,
                         "models": [{"model": str(root / f"ft{i}")} for i in range(3)]})


def test_metagpt_on_the_benchmark_layout_matches_the_measured_run(one_billion):
    root, sizes = one_billion
    est = estimate_recipe(_recipe(root, "metagpt"), TWO_WORKERS)
    total = sum(sizes.values())
    assert total == pytest.approx(6.82e9, rel=1e-3)  # the README's "1B (6.82 GB)"
    assert [i.read_bytes for i in est.inputs] == [sizes[n] for n in ("base", "ft0", "ft1", "ft2")]
    assert est.passes == ["statistics", "merge"] and est.read_bytes == 2 * total
    assert est.write_bytes == sizes["base"]  # bf16 out, same layout
    assert est.largest_tensor in ("lm_head.weight", "model.embed_tokens.weight")
    assert est.seconds == pytest.approx(11.5, rel=0.1)  # measured cold at 1B (median of 3)
    assert est.peak_memory_bytes / GiB == pytest.approx(0.60, rel=0.1)


def test_task_arithmetic_on_the_benchmark_layout_matches_the_measured_run(one_billion):
    root, sizes = one_billion
    est = estimate_recipe(_recipe(root, "task_arithmetic", weight=0.3), TWO_WORKERS)
    assert est.passes == ["merge"] and est.read_bytes == sum(sizes.values())
    assert est.seconds == pytest.approx(10.2, rel=0.1)  # measured 9.8-12.6 s, median 10.2 (1B, 2 workers)
    assert est.peak_memory_bytes / GiB == pytest.approx(0.60, rel=0.1)  # chunked: like metagpt's


def test_cached_norms_drop_the_statistics_pass(one_billion):
    from metamerge.engine import open_inputs
    from metamerge.estimate import estimate

    root, sizes = one_billion
    inputs = open_inputs(_recipe(root, "metagpt"), MergeOptions(hash_inputs=False))
    est = estimate(inputs, "metagpt", stats_cached=True, workers=2)
    assert est.passes == ["merge"] and est.read_bytes == sum(sizes.values())
    assert est.seconds == pytest.approx(8.2, rel=0.1)  # measured warm (norms cached) at 1B


def test_a_method_without_a_benchmark_rate_says_so(one_billion):
    root, _ = one_billion
    assert estimate_recipe(_recipe(root, "linear", weight=0.25)).notes == []
    est = estimate_recipe(_recipe(root, "model_stock"))
    assert est.notes == ["no benchmark rate for model_stock: the task-arithmetic rate is used"]
    assert est.seconds == pytest.approx(STARTUP_S + est.read_bytes / 0.23e9, rel=0.01)
    est = estimate_recipe(_recipe(root, "dare_linear", weight=0.3, density=0.5))
    assert est.seconds == pytest.approx(STARTUP_S + est.read_bytes / 0.06e9, rel=0.01)
