"""PEFT LoRA adapters read as what they are: a low-rank update ``s * B @ A`` per adapted tensor.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is parsed once into an
``AdapterSpec``: for each tensor of the full model it changes, either the two factors and the exact
scale PEFT applies (``lora_alpha / r``, rsLoRA's ``lora_alpha / sqrt(r)``, per-module
``rank_pattern``/``alpha_pattern``), the layout (``fan_in_fan_out`` and embeddings store the update
transposed), or a whole replacement tensor (``modules_to_save``, saved embedding layers). Anything
that is not a plain LoRA update (DoRA, LoHa, LoKr, IA3, LoRA biases, aLoRA, ...) is refused with a
one-line error that names it: an inexact merge would be silently wrong.

The update is formed here in float64 and never more than one tensor at a time; its squared norm is
taken from the factors alone (``factor_sqnorm``), an r x r computation.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MergeError
from .io import ModelReader, TensorInfo
from .reduce import det_dot

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# adapter_config.json settings that make the update something other than s * B @ A: refused by name.
# (key, the name of what it is); a setting counts when it is set to anything truthy.
NOT_PLAIN_LORA = (
    ("use_dora", "DoRA (use_dora: true)"), ("lora_bias", "LoRA with lora_bias"),
    ("layer_replication", "LoRA with layer_replication"), ("target_parameters", "LoRA on target_parameters"),
    ("trainable_token_indices", "LoRA with trainable_token_indices"),
    ("alora_invocation_tokens", "aLoRA (activated LoRA)"), ("arrow_config", "Arrow LoRA routing"),
    ("use_qalora", "QA-LoRA"), ("use_bdlora", "BD-LoRA"), ("kasa_config", "KaSA"),
    ("velora_config", "VeLoRA"), ("monteclora_config", "MonteCLoRA"),
)
FACTOR_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "emb_A", "lora_embedding_B": "emb_B"}


@dataclass(frozen=True)
class Factor:
    """The update of one base tensor: ``scale * B @ A``, transposed when ``transpose``."""

    target: str          # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    module: str          # the module PEFT adapted, e.g. model.layers.0.self_attn.q_proj
    a: str               # key of A (r x in) in the adapter file
    b: str               # key of B (out x r)
    rank: int
    alpha: float
    scale: float
    transpose: bool      # fan_in_fan_out (GPT-2 Conv1D) or an embedding: the update is (B @ A)^T
    embedding: bool


@dataclass
class AdapterSpec:
    """What an adapter folder changes in its base, keyed by the base's tensor names."""

    config: dict
    factors: dict[str, Factor] = field(default_factory=dict)
    full: dict[str, str] = field(default_factory=dict)   # base tensor -> key of its replacement

    @property
    def base_model_name(self) -> str | None:
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_config(path: Path, label: str) -> dict:
    """``adapter_config.json``, refused unless it describes a plain LoRA."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{label}: {ADAPTER_CONFIG} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise MergeError(f"{label}: {ADAPTER_CONFIG} is not a JSON object; re-save the adapter")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise MergeError(f"{label}: {kind} adapters are not supported (only plain LoRA merges exactly); "
                         "merge it into its base with PEFT's merge_and_unload and use that folder")
    for key, what in NOT_PLAIN_LORA:
        if config.get(key):
            raise MergeError(f"{label}: {what} is not supported (only plain LoRA merges exactly); merge it into "
                             "its base with PEFT's merge_and_unload and use that folder")
    return config


def pattern_key(patterns: dict, module: str) -> str | None:
    """The key of ``rank_pattern``/``alpha_pattern`` that applies to ``module``, PEFT's rule
    (``peft.utils.other.get_pattern_key``): the first key matching a dotted suffix of the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def parse_adapter(config: dict, weights: dict[str, TensorInfo], base: dict[str, TensorInfo],
                  label: str) -> AdapterSpec:
    """Map the adapter file's keys onto the base's tensors and check every shape against the base."""
    spec = AdapterSpec(config)
    pairs: dict[str, dict[str, str]] = {}
    for key in weights:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", name)
        if m:
            pairs.setdefault(m.group(1), {})[FACTOR_KEYS[m.group(2)]] = key
            continue
        if ".base_layer." in name:  # a saved embedding layer (resized vocabulary): replaces the base's
            name = name.replace(".base_layer.", ".")
        if name not in base:
            raise MergeError(f"{label}: adapter tensor '{key}' is neither a LoRA factor nor a tensor of the base; "
                             "only plain LoRA adapters (and modules_to_save) can be merged")
        if tuple(weights[key].shape) != base[name].shape:
            raise MergeError(f"{label}: '{key}' has shape {list(weights[key].shape)} but the base's '{name}' is "
                             f"{list(base[name].shape)}; the adapter was trained on another base model")
        spec.full[name] = key
    use_rslora = bool(config.get("use_rslora"))
    fif = bool(config.get("fan_in_fan_out"))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, keys in sorted(pairs.items()):
        embedding = "emb_A" in keys or "emb_B" in keys
        a, b = (keys.get("emb_A"), keys.get("emb_B")) if embedding else (keys.get("A"), keys.get("B"))
        if a is None or b is None:
            raise MergeError(f"{label}: module '{module}' has only one of its LoRA factors; re-save the adapter")
        target = f"{module}.weight"
        if target not in base:
            raise MergeError(f"{label}: the adapter changes '{module}', which the base does not have; "
                             "the adapter was trained on another base model")
        sa, sb = weights[a].shape, weights[b].shape
        rank = sa[0]
        if len(sa) != 2 or len(sb) != 2 or sb[1] != rank:
            raise MergeError(f"{label}: '{module}': LoRA factors of shapes {list(sa)} and {list(sb)} are not a "
                             "rank-r pair (convolution LoRA is not supported)")
        rkey = pattern_key(rank_pattern, module)
        want_rank = rank_pattern[rkey] if rkey else config.get("r", rank)
        if want_rank != rank:
            raise MergeError(f"{label}: '{module}' has rank {rank} in the weights but {want_rank} in "
                             f"{ADAPTER_CONFIG}; re-save the adapter")
        akey = pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[akey] if akey else config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        transpose = embedding or fif
        shape = (sa[1], sb[0]) if transpose else (sb[0], sa[1])
        if shape != base[target].shape:
            raise MergeError(f"{label}: '{module}': the LoRA update has shape {list(shape)} but the base's "
                             f"'{target}' is {list(base[target].shape)}; the adapter was trained on another base model")
        spec.factors[target] = Factor(target, module, a, b, rank, alpha, scale, transpose, embedding)
    return spec


def load_factors(reader: ModelReader, f: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` and ``A`` in float64, checked finite."""
    out = []
    for key in (f.b, f.a):
        t = reader.get(key).to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise MergeError(f"{reader.label}: adapter tensor '{key}' contains NaN or Inf; the adapter is "
                             "damaged: re-train or re-download it")
        out.append(t)
    return out[0], out[1]


def delta(reader: ModelReader, f: Factor) -> torch.Tensor:
    """The update ``scale * B @ A`` in the base tensor's layout, in float64."""
    b, a = load_factors(reader, f)
    d = (b @ a).mul_(f.scale)
    return d.T if f.transpose else d


def factor_sqnorm(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """``||scale * B @ A||_F^2 = scale^2 * tr((B^T B)(A A^T))`` in float64, from the r x r Gram
    matrices of the factors (never the out x in update). Each Gram entry is a ``det_dot`` and the
    trace an exact ``fsum``, so the value is the same on any thread count. Transposing the update
    does not change its norm."""
    bt, a = b.to(torch.float64).T.contiguous(), a.to(torch.float64).contiguous()
    r = a.shape[0]
    gb = [[0.0] * r for _ in range(r)]
    ga = [[0.0] * r for _ in range(r)]
    for i in range(r):
        for j in range(i, r):
            gb[i][j] = gb[j][i] = det_dot(bt[i], bt[j])
            ga[i][j] = ga[j][i] = det_dot(a[i], a[j])
    return scale * scale * math.fsum(gb[i][j] * ga[j][i] for i in range(r) for j in range(r))
