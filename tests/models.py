"""Tiny real ``transformers`` models for the engine tests, and the small helpers the tests use to
check a merge independently of the engine (reading safetensors, writing recipes).

A *family* is a base model and fine-tunes that are the base plus known, seeded perturbations,
all written by ``save_pretrained`` (safetensors). Some tensors are changed by no fine-tune
(the norms), one tensor only by some of them, so every code path of the coefficients is reached.
Nothing here calls the engine's math.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

VOCAB = 64
HIDDEN = 16
LAYERS = 2
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass
class Family:
    """A base and its fine-tunes on disk, and what the builder knows about them."""

    name: str
    arch: str                 # "llama" or "gpt2"
    dtype: torch.dtype
    tied: bool
    sharded: bool
    base: Path
    finetunes: list[Path]
    num_layers: int = LAYERS
    unchanged: list[str] = field(default_factory=list)   # tensors no fine-tune changed
    partial: list[str] = field(default_factory=list)     # tensors fine-tune 0 left unchanged

    @property
    def refs(self) -> list[str]:
        return [str(p) for p in self.finetunes]


# ------------------------------------------------------------------------------ building


def build_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer with exactly ``vocab_size`` tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_config(arch: str, *, vocab: int = VOCAB, tied: bool = False, layers: int = LAYERS):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=32, tie_word_embeddings=tied,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=layers, n_head=2, n_positions=32,
                          tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


def make_model(arch: str, *, seed: int, vocab: int = VOCAB, tied: bool = False, layers: int = LAYERS):
    """A model whose every parameter is seeded random (norm weights near 1, the rest near 0)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config(arch, vocab=vocab, tied=tied, layers=layers))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if is_norm(name) else 0.05 * noise)
    return model.eval()


def is_norm(name: str) -> bool:
    return "norm" in name or ".ln_" in name


def partial_tensor(arch: str) -> str:
    """A tensor pattern fine-tune 0 leaves untouched (so per-tensor lambdas give it 0)."""
    return "mlp.down_proj" if arch == "llama" else "mlp.c_proj"


def perturb(model, *, seed: int, scale: float, skip: Callable[[str], bool]):
    """A copy of ``model`` plus seeded Gaussian noise on every parameter not skipped."""
    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(ft.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if not skip(name):
                p.add_(scale * noise.to(p.dtype))
    return ft


def save(model, path: Path, *, dtype: torch.dtype, shard: str | None = None,
         tokenizer=None, generation_config: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    if not generation_config:
        (path / "generation_config.json").unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def build_family(root: Path, name: str, *, arch: str = "llama", dtype: torch.dtype = torch.float32,
                 tied: bool = False, shard: str | None = None, n_finetunes: int = 2,
                 seed: int = 0, generation_config: bool = True, explicit_head: bool = False) -> Family:
    """Base + ``n_finetunes`` fine-tunes; fine-tune k adds noise of scale 0.01 * (k + 1).

    ``explicit_head`` (tied models only): also store ``lm_head.weight`` (equal to the embedding),
    as some checkpoints do, so the engine must recognise the pair as one tensor.
    """
    root = Path(root) / name
    base_model = make_model(arch, seed=seed, tied=tied)
    save(base_model, root / "base", dtype=dtype, shard=shard, tokenizer=build_tokenizer(),
         generation_config=generation_config)
    part = partial_tensor(arch)
    fts = []
    for k in range(n_finetunes):
        def skip(n, k=k):
            return is_norm(n) or (k == 0 and part in n)
        ft = perturb(base_model, seed=1000 * (seed + 1) + k, scale=0.01 * (k + 1), skip=skip)
        fts.append(save(ft, root / f"ft{k}", dtype=dtype, shard=shard))
    fam = Family(name, arch, dtype, tied, bool(shard), root / "base", fts)
    if explicit_head:
        for d in [fam.base, *fts]:
            state = load_state(d)
            emb = "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"
            state["lm_head.weight"] = state[emb].clone()
            write_state(d, state)
    names = list(load_state(fam.base))
    fam.unchanged = [n for n in names if is_norm(n)]
    fam.partial = [n for n in names if part in n]
    return fam


# ------------------------------------------------------------------------------ files


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, from all of its safetensors files (shards included)."""
    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    for f in files:
        state.update(load_file(str(f)))
    return state


def write_state(path: Path, state: dict[str, torch.Tensor], *, config_edit=None) -> Path:
    """Replace a directory's weights with ``state`` in one ``model.safetensors``."""
    path = Path(path)
    for f in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((path / "config.json").read_text())
        config_edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def derive(src: Path, dst: Path, edit: Callable[[dict], None] | None = None, *, config_edit=None) -> Path:
    """A copy of model ``src`` at ``dst`` (single safetensors file) with ``edit`` applied to its state."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(f, dst / f.name)
    state = load_state(src)
    if edit is not None:
        edit(state)
    return write_state(dst, state, config_edit=config_edit)


def pickled(src: Path, dst: Path, file: str = "pytorch_model.bin", wrap: Callable[[dict], object] | None = None) -> Path:
    """A copy of model ``src`` at ``dst`` whose weights are a pickle checkpoint ``file`` instead of
    safetensors: the state itself, or ``wrap(state)`` (e.g. a training checkpoint around it)."""
    path = derive(src, dst)
    state = load_state(path)
    (path / "model.safetensors").unlink()
    torch.save(state if wrap is None else wrap(state), path / file)
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name (``model.layers.3.`` / ``transformer.h.3.``)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


# ------------------------------------------------------------------------------ running


def run_merge(recipe: dict, out_dir, **options):
    """Validate ``recipe`` (a dict) and merge it into ``out_dir`` on the CPU, quietly."""
    from metamerge.engine import MergeOptions, merge
    from metamerge.recipe import parse_recipe

    options.setdefault("device", "cpu")
    options.setdefault("progress", False)
    return merge(parse_recipe(recipe), out_dir, MergeOptions(**options))


def assert_nothing_written(out_dir: Path) -> None:
    """The output directory does not exist and no temporary sibling was left behind."""
    out_dir = Path(out_dir)
    assert not out_dir.exists(), f"{out_dir} was written"
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert leftovers == [], f"temporary output left behind: {leftovers}"


def hub_snapshot(cache: Path, repo: str, commit: str, src: Path) -> Path:
    """A snapshot of ``src`` in the hub cache's layout: blobs/, snapshots/<commit>/ links, and
    refs/main pointing at ``commit`` (a second call for the same repo moves the branch)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in src.iterdir():
        blob = root / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap
