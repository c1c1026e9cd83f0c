"""Real PEFT LoRA adapters of a tiny real model, for the adapter tests, and their full-weight
equivalents computed by PEFT itself (``merge_and_unload`` in float64), which the tests compare the
engine against. Nothing here calls the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_tokenizer, make_model, perturb, save


@dataclass
class LoraSpec:
    """How one test adapter is built: a PEFT ``LoraConfig``'s arguments and a seed for its factors."""

    name: str
    config: dict
    seed: int
    arch: str = "llama"


ADAPTERS = [
    LoraSpec("plain", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, seed=11),
    LoraSpec("rslora", {"r": 2, "lora_alpha": 16, "use_rslora": True,
                           "target_modules": ["q_proj", "o_proj", "down_proj"],
                           "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"layers.1.self_attn.q_proj": 5}},
                seed=12),
    LoraSpec("saved", {"r": 3, "lora_alpha": 6, "target_modules": ["up_proj", "k_proj"],
                          "modules_to_save": ["lm_head"]}, seed=13),
]


def peft_model(base_dir: Path, spec: LoraSpec):
    """The base with ``spec``'s adapter attached, every factor seeded random (B too: PEFT starts B
    at zero, which would make every update zero) and a saved module perturbed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(spec.seed)  # PEFT draws A from the global generator
    model = get_peft_model(base, LoraConfig(**spec.config))
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def build_adapter(base_dir: Path, out: Path, spec: LoraSpec) -> Path:
    model = peft_model(base_dir, spec)
    model.save_pretrained(out)
    return out


def full_weights(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The full model the adapter stands for, by PEFT: loaded in float64 and merged into the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def build_base(root: Path, arch: str = "llama", seed: int = 0) -> Path:
    return save(make_model(arch, seed=seed), root / f"base-{arch}", dtype=torch.float32, tokenizer=build_tokenizer())


def build_full_finetune(root: Path, base_dir: Path, seed: int = 21) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ft = perturb(base, seed=seed, scale=0.01, skip=lambda n: False)
    return save(ft, root / "full-ft", dtype=torch.float32, tokenizer=build_tokenizer())
