"""Benchmark for the scale-out issue: metamerge (MetaGPT, whole-model lambdas) against mergekit
0.1.5 `mergekit-yaml` (task_arithmetic at its default bf16 compute) on a bf16 Llama, cold and warm,
and metamerge on 1 and 2 local workers and on a 2-worker Dask cluster.

Run by hand (not a test; about 10 minutes at 1B on 2 cores):

    .venv/bin/python bench/bench_scale.py --params 1B --repeats 3 --workdir /tmp/mm-bench

- inputs: `bench_merge.build_models` (synthetic Llama, bf16, 1 GB shards; 1B = hidden 2048,
  16 layers, vocab 32000: 0.93B parameters), base + 3 fine-tunes, read into the page cache before
  every run;
- runs alternate (mergekit, metamerge cold, metamerge warm) `--repeats` times; medians are printed;
- cold: an empty METAMERGE_CACHE_DIR (every input hashed, every norm computed); warm: the cache
  the cold run just filled (hashes and norms cached: the merge pass only);
- peak memory: the peak over time of the summed PSS of the command and all its descendants
  (worker processes included; PSS splits shared pages, so a library mapped by 3 processes counts
  once), sampled every 250 ms (more often, the sampling itself slowed the runs), beside ru_maxrss
  of the largest single process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_merge import build_models, dir_gb, warm_page_cache  # noqa: E402
from mergekit_runner import find_mergekit  # noqa: E402


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (from /proc/PID/task/*/children: no scan of every process)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return kids


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_gib(root: int) -> float:
    todo, total = [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kib(pid)
        todo.extend(_children(pid))
    return total / (1 << 20)


SAMPLE_S = 0.25  # reading smaps_rollup walks page tables: sampled often, it steals a core from the run


def run(cmd: list[str], env: dict) -> dict:
    """Wall seconds, peak summed PSS of the process tree, largest single RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_gib(proc.pid))
            stop.wait(SAMPLE_S)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    err = proc.stderr.read().decode()
    if status != 0:
        sys.stderr.write(err[-2000:])
    return {"wall_s": round(wall, 2), "peak_pss_GiB": round(peak[0], 3),
            "max_rss_GiB": round(usage.ru_maxrss / (1 << 20), 3), "rc": os.waitstatus_to_exitcode(status)}


def start_dask(workers: int, env: dict) -> tuple[str, list[subprocess.Popen]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dask = str(Path(sys.executable).with_name("dask"))
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-show",
                               "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for _ in range(workers):
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, timeout="60s") as c:
        c.wait_for_workers(workers, timeout=120)
    return address, procs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="1B")
    ap.add_argument("--finetunes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mm-bench"))
    ap.add_argument("--no-executors", action="store_true", help="skip the --workers 1 / 2 / dask comparison")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    dirs = build_models(args.params, args.finetunes, args.workdir / "models")
    gb = dir_gb(dirs)
    print(f"# {args.params}: base + {len(dirs) - 1} fine-tunes, {gb:.2f} GB of bf16 input, {os.cpu_count()} cores",
          flush=True)
    ours_recipe = {"merge_method": "metagpt", "base_model": str(dirs[0]), "models": [{"model": str(d)} for d in dirs[1:]]}
    mk_recipe = {"merge_method": "task_arithmetic", "base_model": str(dirs[0]), "dtype": "bfloat16",
                 "parameters": {"lambda": 0.3}, "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs[1:]]}
    args.workdir.mkdir(parents=True, exist_ok=True)
    r_ours, r_mk = args.workdir / "scale-metagpt.yaml", args.workdir / "scale-mergekit.yaml"
    r_ours.write_text(yaml.safe_dump(ours_recipe, sort_keys=False))
    r_mk.write_text(yaml.safe_dump(mk_recipe, sort_keys=False))
    out = args.workdir / "scale-out"
    cache = args.workdir / "scale-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "METAMERGE_CACHE_DIR": str(cache)}
    metamerge = str(Path(sys.executable).with_name("metamerge"))
    mergekit = find_mergekit()
    ours = [metamerge, "merge", str(r_ours), str(out), "--device", "cpu", "--no-progress"]
    jobs = {"mergekit task_arithmetic bf16": [mergekit, str(r_mk), str(out), "--no-cuda", "--device", "cpu", "--quiet",
                                              "--no-write-model-card"] if mergekit else None,
            "metamerge metagpt cold": ours, "metamerge metagpt warm": ours}
    results: dict[str, list[dict]] = {k: [] for k in jobs if jobs[k]}
    for rep in range(args.repeats):
        for label, cmd in jobs.items():
            if cmd is None:
                continue
            if label.endswith("cold"):
                shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no writeback of the previous run's output left to slow this one down
            warm_page_cache(dirs)
            r = run(cmd, env)
            results[label].append(r)
            print(f"  run {rep + 1} {label:<32} wall {r['wall_s']:6.1f} s  peak PSS {r['peak_pss_GiB']:5.2f} GiB  "
                  f"max RSS {r['max_rss_GiB']:5.2f} GiB  rc={r['rc']}", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "peak_pss_GiB", "max_rss_GiB")}
           for k, v in results.items()}
    print(f"\n## medians of {args.repeats} ({args.params}, inputs in the page cache)")
    print("| | wall (s) | peak memory, summed PSS (GiB) | x mergekit wall | x mergekit memory |")
    print("|---|---|---|---|---|")
    mk = med.get("mergekit task_arithmetic bf16")
    for k, m in med.items():
        ratio = f"{m['wall_s'] / mk['wall_s']:.2f}" if mk else "-"
        mratio = f"{m['peak_pss_GiB'] / mk['peak_pss_GiB']:.2f}" if mk else "-"
        print(f"| {k} | {m['wall_s']:.1f} | {m['peak_pss_GiB']:.2f} | {ratio} | {mratio} |")

    if not args.no_executors:
        print("\n## executors (cold cache each, one run each)")
        variants = {"--workers 1": ["--workers", "1"], "--workers 2": ["--workers", "2"]}
        address, procs = start_dask(2, env)
        variants["--dask (2 workers)"] = ["--dask", address]
        try:
            for label, extra in variants.items():
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                warm_page_cache(dirs)
                r = run(ours + extra, env)
                med[f"executor {label}"] = r
                print(f"| {label} | {r['wall_s']:.1f} s | peak PSS {r['peak_pss_GiB']:.2f} GiB (client side only for dask) |",
                      flush=True)
        finally:
            for p in procs:
                p.terminate()
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
