"""Shared by the parity tests: tiny real models of three architectures, and running one recipe
through the real ``mergekit-yaml`` (0.1.5, its own venv, float32 compute) and ``metamerge merge``.

Architectures (each base + 3 fine-tunes, bfloat16, ``save_pretrained``):
``llama`` with grouped-query attention, ``qwen2`` with tied embeddings, ``gpt2`` (Conv1D weights).
Fine-tune i is the base plus seeded noise of scale 0.01 * (i + 1); ``norm`` weights move too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from mergekit_runner import find_mergekit, run_mergekit  # noqa: E402

MERGEKIT = find_mergekit()
ARCHS = ("llama", "qwen2", "gpt2")
MANTISSA = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def make_config(arch: str):
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    if arch == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    if arch == "gpt2":
        from transformers import GPT2Config
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=96, n_positions=64)
    raise ValueError(arch)


def build_models(root: Path, arch: str, n_finetunes: int = 3, seed: int = 0) -> dict[str, Path]:
    """``{"base": path, "ft0": path, ...}`` for ``arch``, written with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(make_config(arch)).to(torch.bfloat16)
    paths = {"base": root / arch / "base"}
    base.save_pretrained(paths["base"])
    state = base.state_dict()
    for i in range(n_finetunes):
        g = torch.Generator().manual_seed(100 * seed + 10 + i)
        sd = {k: (v.float() + 0.01 * (i + 1) * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in state.items()}
        ft = AutoModelForCausalLM.from_config(make_config(arch)).to(torch.bfloat16)
        ft.load_state_dict(sd)
        paths[f"ft{i}"] = root / arch / f"ft{i}"
        ft.save_pretrained(paths[f"ft{i}"])
    return paths


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_both(tmp_path: Path, recipe: dict, seed: int = 0, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The recipe through mergekit and through metamerge; both outputs' tensors."""
    from metamerge.cli import main as metamerge_main

    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_mergekit(rpath, tmp_path / "mk", extra_args=("--no-write-model-card",), seed=seed)
    assert metamerge_main(["merge", str(rpath), str(tmp_path / "mm"), "--no-progress", *extra]) == 0
    return load_dir(tmp_path / "mk"), load_dir(tmp_path / "mm")


def assert_same_tensors(mk: dict, mm: dict, label: str = "") -> None:
    """Same names, dtypes and shapes; values equal within one rounding step of the storage dtype
    (exactly equal is the common case; one step allows a different but equally valid rounding)."""
    assert sorted(mk) == sorted(mm), f"{label}: tensor names differ: {sorted(set(mk) ^ set(mm))}"
    for name in mk:
        a, b = mk[name], mm[name]
        assert a.dtype == b.dtype, f"{label} {name}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{label} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if torch.equal(a, b):
            continue
        x, y = a.double(), b.double()
        _, e = torch.frexp(torch.maximum(x.abs(), y.abs()))
        step = torch.pow(2.0, (e - MANTISSA.get(a.dtype, 24)).double())
        bad = (x - y).abs() > step
        assert not bad.any(), (f"{label} {name}: {int(bad.sum())} of {a.numel()} values differ by more than one "
                               f"rounding step (max {float((x - y).abs().max()):.3g})")


def recipe_for(models: dict[str, Path], method: str, per_model: list[dict | None], global_params: dict | None = None,
               *, base: bool = True, **top) -> dict:
    """A mergekit recipe over ``ft0..ft{n-1}`` (per_model gives each one's parameters)."""
    recipe: dict = {"merge_method": method}
    if base:
        recipe["base_model"] = str(models["base"])
    recipe["models"] = [{"model": str(models[f"ft{i}"]), **({"parameters": p} if p else {})}
                        for i, p in enumerate(per_model)]
    recipe["dtype"] = "float32"
    if global_params:
        recipe["parameters"] = global_params
    recipe.update(top)
    return recipe
