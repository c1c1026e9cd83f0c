"""Tiny models and params for the pipeline tests (imported by the tests and their conftest)."""

from __future__ import annotations

import json
from pathlib import Path

TASKS = {"add": lambda a, b: (f"add {a}+{b}=", str(a + b)), "rev": lambda a, b: (f"rev {a}{b}x=", f"x{b}{a}")}


def build_models(root: Path, n_finetunes: int = 4) -> dict[str, Path]:
    """A Llama with hidden size 16 and one layer, and ``n_finetunes`` perturbed copies of it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scenarios.data import build_tokenizer

    tok = build_tokenizer(["add 1+2=3", "rev 12x=x21"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.float32)
    base.generation_config.pad_token_id = tok.pad_token_id
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    tok.save_pretrained(out["base"])
    for i in range(n_finetunes):
        name = f"ft-{'abcdefgh'[i]}"
        ft = LlamaForCausalLM(config).to(torch.float32)
        ft.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * (i + 1))
        ft.generation_config.pad_token_id = tok.pad_token_id
        out[name] = root / name
        ft.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    evals = root / "eval"
    evals.mkdir()
    for task, make in TASKS.items():
        with open(evals / f"{task}.jsonl", "w") as fh:
            for a, b in [(1, 2), (3, 4), (5, 6)]:
                prompt, completion = make(a, b)
                fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
        out[f"eval-{task}"] = evals / f"{task}.jsonl"
    return out


def params_for(models: dict[str, Path], root: Path, fine_tunes=("ft-a", "ft-b", "ft-c"), **pipeline) -> dict:
    """A pipeline params mapping over the tiny models, writing under ``root``."""
    recipe = {"merge_method": "metagpt", "base_model": str(models["base"]),
              "models": [{"model": str(models[f])} for f in fine_tunes], "dtype": "float32", "name": "tiny"}
    pipe = {"output_root": str(root / "out"), "device": "cpu",
            "eval_sets": {t: str(models[f"eval-{t}"]) for t in TASKS},
            "experts": {"add": str(models["ft-a"]), "rev": str(models["ft-b"])},
            "eval": {"batch_size": 8, "max_new_tokens": 4, "exact_match": True}, **pipeline}
    return {"recipe": recipe, "pipeline": pipe}
