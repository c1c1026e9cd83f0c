"""Benchmark: wall time, input throughput and peak RSS of `metamerge merge` per method,
against `mergekit-yaml` doing task arithmetic on the same inputs.

Run by hand (not a test):

    .venv/bin/python bench/bench_merge.py --params 200M 1B --finetunes 3 --workdir /tmp/mm-bench

Each run starts with its inputs in the page cache (read once just before it; --cold to skip that).

It builds a synthetic Llama-style model of each size (bf16, sharded safetensors written with
`safetensors.torch.save_file`, loadable by transformers) plus N fine-tunes (base + seeded noise),
once, and reuses them. Each merge runs in its own process; peak RSS is that process's
`ru_maxrss` (from wait4). mergekit runs from `.venv-mergekit` (see bench/mergekit_runner.py);
pass --no-mergekit to skip it. The figures go to stdout as a table and to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "metagpt": {"merge_method": "metagpt"},
    "metagpt_tensor": {"merge_method": "metagpt", "parameters": {"granularity": "tensor"}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}, "weight": 1.0},
    "ties": {"merge_method": "ties", "parameters": {"lambda": 1.0}, "weight": 1.0, "density": 0.5},
    "dare_ties": {"merge_method": "dare_ties", "weight": 1.0, "density": 0.5},
    "linear": {"merge_method": "linear", "weight": 1.0},
}
SIZES = {  # approximate parameter count -> (hidden, intermediate, layers, vocab)
    "50M": (512, 1408, 8, 32000),
    "200M": (1024, 2816, 12, 32000),
    "500M": (1536, 4096, 14, 32000),
    "1B": (2048, 5632, 16, 32000),
}


def llama_config(size: str) -> dict:
    h, inter, layers, vocab = SIZES[size]
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256),
                      vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture table from this
    return cfg


def build_models(size: str, finetunes: int, root: Path, shard_bytes: int = 1 << 30) -> list[Path]:
    """Base and fine-tunes as bf16 sharded safetensors; built once, a tensor at a time."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    dirs = [root / size / "base"] + [root / size / f"ft{i}" for i in range(finetunes)]
    for idx, d in enumerate(dirs):
        if (d / "model.safetensors.index.json").exists():
            continue
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cfg.save_pretrained(tmp)
        shard: dict[str, torch.Tensor] = {}
        shards: list[dict] = []
        weight_map: dict[str, str] = {}

        def flush():
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shards.append({})
            shard.clear()

        for t_i, (name, shape) in enumerate(sorted(shapes.items())):
            g = torch.Generator().manual_seed(t_i)
            w = torch.randn(shape, generator=g) * 0.02
            if idx:  # fine-tune: base plus its own seeded update of a different size
                g2 = torch.Generator().manual_seed(1_000_003 * idx + t_i)
                w += torch.randn(shape, generator=g2) * (0.001 * idx)
            shard[name] = w.to(torch.bfloat16)
            if sum(v.numel() * 2 for v in shard.values()) >= shard_bytes:
                flush()
        if shard:
            flush()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(2 * torch.Size(s).numel() for s in shapes.values())},
             "weight_map": weight_map}, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return dirs


def run_measured(cmd: list[str], env=None) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in GiB, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return wall, usage.ru_maxrss / (1 << 20), os.waitstatus_to_exitcode(status)


def recipe_for(method: str, dirs: list[Path]) -> dict:
    spec = dict(METHODS[method])
    per = {k: spec.pop(k) for k in ("weight", "density") if k in spec}
    models = [{"model": str(d), **({"parameters": per} if per else {})} for d in dirs[1:]]
    recipe = {**spec, "base_model": str(dirs[0]), "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    return recipe


def warm_page_cache(dirs: list[Path]) -> None:
    """Read every input file once, so that each tool starts with its inputs in the page cache.

    Without it the first tool of a size pays for the disk and the last one does not: the order of
    the jobs, not the tools, would decide the comparison.
    """
    for f in sorted(f for d in dirs for f in d.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 26):
                pass


def dir_gb(dirs: list[Path]) -> float:
    return sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors")) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", nargs="+", default=["200M"], choices=list(SIZES))
    ap.add_argument("--finetunes", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mm-bench"))
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cold", action="store_true",
                    help="do not read the inputs into the page cache before each run (then job order matters)")
    args = ap.parse_args()

    metamerge = str(Path(sys.executable).with_name("metamerge"))
    sys.path.insert(0, str(ROOT / "bench"))
    from mergekit_runner import find_mergekit  # noqa: E402

    mergekit = None if args.no_mergekit else find_mergekit()
    rows = []
    for size in args.params:
        t0 = time.perf_counter()
        dirs = build_models(size, args.finetunes, args.workdir / "models")
        build_s = time.perf_counter() - t0
        in_gb = dir_gb(dirs)
        print(f"# {size}: {len(dirs) - 1} fine-tunes, input {in_gb:.2f} GB (built/reused in {build_s:.0f} s)", flush=True)
        jobs = [(m, [metamerge, "merge", "{recipe}", "{out}", "--device", "cpu", "--no-progress"]) for m in args.methods]
        if mergekit:
            jobs.append(("mergekit:task_arithmetic", [mergekit, "{recipe}", "{out}", "--random-seed", "0",
                                                      "--no-cuda", "--device", "cpu", "--quiet",
                                                      "--no-write-model-card"]))
        for label, template in jobs:
            method = label.split(":")[-1]
            recipe = recipe_for(method, dirs)
            rpath = args.workdir / f"{size}-{label.replace(':', '_')}.yaml"
            rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
            out = args.workdir / "out" / f"{size}-{label.replace(':', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [c.replace("{recipe}", str(rpath)).replace("{out}", str(out)) for c in template]
            if not args.cold:
                warm_page_cache(dirs)
            wall, rss, rc = run_measured(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            row = {"size": size, "tool": label, "wall_s": round(wall, 2), "input_GB_per_s": round(in_gb / wall, 3),
                   "peak_rss_GiB": round(rss, 3), "rc": rc}
            rows.append(row)
            print(f"{size:>5} {label:<26} wall {wall:7.1f} s  {in_gb / wall:6.3f} GB/s  peak RSS {rss:6.2f} GiB  rc={rc}",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
        ours = next((r for r in rows if r["size"] == size and r["tool"] == "task_arithmetic"), None)
        mk = next((r for r in rows if r["size"] == size and r["tool"].startswith("mergekit")), None)
        mg = next((r for r in rows if r["size"] == size and r["tool"] == "metagpt"), None)
        if mk and mg and mk["rc"] == 0:
            print(f"{size:>5} ratio metagpt / mergekit task_arithmetic wall: {mg['wall_s'] / mk['wall_s']:.2f}"
                  + (f"; our task_arithmetic / mergekit: {ours['wall_s'] / mk['wall_s']:.2f}" if ours else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
