"""Scale-out: the merge as units on local worker processes and on Dask, resumable and cached.

Real parts throughout: real worker processes, a real ``distributed.LocalCluster``, a separately
started ``dask scheduler`` with two ``dask worker`` processes, a real SIGKILL. Every output is
compared byte for byte with the same merge run in this process with one worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from metamerge import cache
from metamerge.engine import MergeOptions
from metamerge.errors import MergeError
from metamerge.executors import ExecutorConfig
from metamerge.recipe import parse_recipe
from metamerge.report import MergeReport

from models import derive, load_state, run_merge, write_recipe, write_state

ROOT = Path(__file__).resolve().parents[1]
DASK_BIN = Path(sys.executable).parent / "dask"
UNIT = 48 * 1024  # bytes per merge unit: many units from a model of a few MB


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A base and three fine-tunes of a ~1.3M-parameter bfloat16 Llama (a few MB each): large
    enough for ~100 merge units, small enough to build in a second."""
    root = tmp_path_factory.mktemp("medium")
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    fts = []
    for k in range(3):
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01 * (k + 1))
            base.save_pretrained(root / f"ft{k}")
            for p, q in zip(base.parameters(), AutoModelForCausalLM.from_pretrained(root / "base").parameters()):
                p.copy_(q)
        fts.append(str(root / f"ft{k}"))
    return {"base": str(root / "base"), "models": fts}


def metagpt(m, models=None):
    return {"merge_method": "metagpt", "base_model": m["base"],
            "models": [{"model": r} for r in (models or m["models"])]}


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith((".safetensors", ".json"))
            and p.name != "provenance.json"}


def weights(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(out).items() if k.startswith("model")}


def one_worker(recipe, out, **kw):
    return run_merge(recipe, out, progress=False, unit_bytes=UNIT, executor=ExecutorConfig(n_workers=1), **kw)


def test_units_are_many_and_output_is_a_normal_model(medium, tmp_path):
    from metamerge.io.writer import shard_layout
    from metamerge.unit_plan import unit_ranges

    result = one_worker(metagpt(medium), tmp_path / "out", max_shard_size="2MB")
    plan = result.plan
    shards = shard_layout([(n, plan.out_shapes[n], plan.out_dtypes[n]) for n in plan.names], 2_000_000)
    units = unit_ranges(shards, UNIT)
    assert len(shards) > 1 and len(units) > 30
    assert [n for u in units for n in u.names] == plan.names  # every tensor once, in order
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # independent check: theta_0 + sum lambda_t tau_t in float64 from the files
    base = load_state(Path(medium["base"]))
    fts = [load_state(Path(r)) for r in medium["models"]]
    sq = [sum(float(((f[n].double() - base[n].double()) ** 2).sum()) for n in base) for f in fts]
    lam = [s / sum(sq) for s in sq]
    name = "model.layers.2.mlp.up_proj.weight"
    expect = base[name].double() + sum(lam[i] * (fts[i][name].double() - base[name].double()) for i in range(3))
    got = dict(model.named_parameters())[name].detach()
    # computed in float32, stored in bfloat16: within one bfloat16 rounding step of the float64 value
    assert torch.allclose(got.double(), expect, rtol=2**-7, atol=1e-6) and not torch.equal(got, base[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no lock left


def test_same_bytes_on_one_worker_two_processes_and_a_dask_local_cluster(medium, tmp_path):
    reference = one_worker(metagpt(medium), tmp_path / "w1", max_shard_size="2MB")
    run_merge(metagpt(medium), tmp_path / "w2", progress=False, unit_bytes=UNIT, max_shard_size="2MB",
              executor=ExecutorConfig(n_workers=2))
    run_merge(metagpt(medium), tmp_path / "dask", progress=False, unit_bytes=UNIT, max_shard_size="2MB",
              executor=ExecutorConfig(kind="dask", n_workers=2))
    assert files(tmp_path / "w1") == files(tmp_path / "w2") == files(tmp_path / "dask")
    assert len(weights(tmp_path / "w1")) > 2
    assert MergeReport.load(tmp_path / "dask").coefficients == reference.report.coefficients


@pytest.mark.parametrize("kind", ["tied", "dare", "ties"])
def test_same_bytes_across_workers_for_tied_and_random_methods(kind, tiny_gpt2_tied, medium, tmp_path):
    if kind == "tied":  # a tied tensor whose target is merged in another unit
        fam = tiny_gpt2_tied
        recipe = {"merge_method": "metagpt", "base_model": str(fam.base), "models": [{"model": r} for r in fam.refs]}
        unit = 2048
    else:
        method = "dare_ties" if kind == "dare" else "ties"
        recipe = {"merge_method": method, "base_model": medium["base"], "parameters": {"seed": 3},
                  "models": [{"model": r, "parameters": {"weight": 0.5, "density": 0.5}} for r in medium["models"]]}
        unit = UNIT
    run_merge(recipe, tmp_path / "a", progress=False, unit_bytes=unit, executor=ExecutorConfig(n_workers=1))
    run_merge(recipe, tmp_path / "b", progress=False, unit_bytes=unit, executor=ExecutorConfig(n_workers=2))
    assert files(tmp_path / "a") == files(tmp_path / "b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cluster(tmp_path: Path, workers: int = 2, nanny: bool = True):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    log = open(tmp_path / "cluster.log", "w")
    procs = [subprocess.Popen([str(DASK_BIN), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], env=env, stdout=log, stderr=log)]
    for i in range(workers):
        procs.append(subprocess.Popen([str(DASK_BIN), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--name", f"w{i}", "--no-dashboard", "--local-directory", str(tmp_path / f"w{i}"),
                                       *([] if nanny else ["--no-nanny"])],
                                      env=env, stdout=log, stderr=log))
    from distributed import Client

    with Client(address, timeout="60s") as client:
        client.wait_for_workers(workers, timeout=120)
    return address, procs


def _stop(procs) -> None:
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_cli_on_a_separately_started_dask_cluster(medium, tmp_path):
    reference = tmp_path / "ref"
    one_worker(metagpt(medium), reference)
    recipe = write_recipe(tmp_path / "r.yaml", metagpt(medium))
    address, procs = _start_cluster(tmp_path)
    try:
        out = tmp_path / "out"
        run = subprocess.run([sys.executable, "-m", "metamerge.cli", "merge", str(recipe), str(out), "--dask", address,
                              "--unit-size", str(UNIT), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
        assert run.returncode == 0, run.stderr
        from distributed import Client

        with Client(address) as client:  # both workers did some of the work
            seen = client.run(lambda: sorted(os.listdir(".")))
        assert len(seen) == 2
    finally:
        _stop(procs)
    assert files(out) == files(reference)


def test_a_worker_killed_mid_merge_and_the_merge_still_finishes_identically(medium, tmp_path):
    """Two ``dask worker`` processes (no nanny, so the PID is the worker); one is SIGKILLed once a
    few units are done; the scheduler gives its units to the other and the output is the same."""
    reference = tmp_path / "ref"
    one_worker(metagpt(medium), reference)
    address, procs = _start_cluster(tmp_path, nanny=False)
    victim = procs[1]
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while time.monotonic() < deadline:
            if sum(1 for s in tmp_path.glob(".out.stage-*") for _ in (s / "units").glob("*.json")) >= 3:
                victim.kill()
                killed.set()
                return
            time.sleep(0.002)

    t = threading.Thread(target=killer)
    t.start()
    try:
        run_merge(metagpt(medium), tmp_path / "out", progress=False, unit_bytes=8192,
                  executor=ExecutorConfig(kind="dask", address=address))
    finally:
        t.join()
        _stop(procs)
    assert killed.is_set() and victim.returncode == -signal.SIGKILL
    assert files(tmp_path / "out") == files(reference)


def _cli(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metamerge.cli", "merge", str(recipe), str(out), "--no-progress",
                             "--workers", "1", "--unit-size", "8KB", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _kill_after(proc: subprocess.Popen, tmp_path: Path, records: int, sig: int) -> int:
    """Send ``sig`` to the merge once ``records`` units are recorded in its staging directory."""
    deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        done = sum(1 for s in tmp_path.glob(".out.stage-*") for _ in (s / "units").glob("*.json"))
        if done >= records:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    return done


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_stops_workers_and_merge_as_one(sig, status, medium, tmp_path):
    """Ctrl-C in a terminal (or a service manager's SIGTERM) reaches the workers and the fork
    server too, not only the merge: the merge still ends with its one line and status, no worker
    prints a traceback, nothing hangs, no process of the command is left, and the rerun resumes."""
    reference = tmp_path / "ref"
    one_worker(metagpt(medium), reference)
    recipe = write_recipe(tmp_path / "r.yaml", metagpt(medium))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "metamerge.cli", "merge", str(recipe), str(out), "--no-progress",
                             "--workers", "2", "--unit-size", "8KB"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)  # its own process group, as a terminal's job is
    deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(1 for s in tmp_path.glob(".out.stage-*") for _ in (s / "units").glob("*.json")) >= 3:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=120)
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert proc.returncode == status, err
    assert err.strip() == f"error: stopped by {name}; the output was not written (rerun the same command to resume)"
    left = []
    for _ in range(100):  # the fork server and resource tracker see this process gone and exit
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes of the stopped merge still running: {left}"
    rerun = _cli(recipe, out)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "resuming: " in err, err
    assert files(out) == files(reference)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_merge_then_the_rerun_resumes_to_identical_bytes(sig, medium, tmp_path):
    reference = tmp_path / "ref"
    one_worker(metagpt(medium), reference)
    recipe = write_recipe(tmp_path / "r.yaml", metagpt(medium))
    out = tmp_path / "out"
    proc = _cli(recipe, out)
    done = _kill_after(proc, tmp_path, 5, sig)
    _, err = proc.communicate()
    assert done >= 5
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # one line, and the finished units kept for the rerun
        assert proc.returncode == 143, err
        assert err.strip() == "error: stopped by SIGTERM; the output was not written (rerun the same command to resume)"
    assert not out.exists() and len(list(tmp_path.glob(".out.stage-*"))) == 1

    rerun = _cli(recipe, out)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    line = next(x for x in err.splitlines() if x.startswith("resuming: "))
    k, n = map(int, line.split()[1].split("/"))
    assert k >= 5 and n > k and line == f"resuming: {k}/{n} units already complete"
    assert files(out) == files(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml", "ref"]  # nothing left beside OUT


def test_a_damaged_staged_unit_is_merged_again(medium, tmp_path):
    """A recorded range whose bytes no longer match its sha256 (a torn write, a bad disk) is not
    trusted: the rerun merges that unit again."""
    reference = tmp_path / "ref"
    one_worker(metagpt(medium), reference)
    recipe = write_recipe(tmp_path / "r.yaml", metagpt(medium))
    out = tmp_path / "out"
    proc = _cli(recipe, out)
    _kill_after(proc, tmp_path, 5, signal.SIGKILL)
    proc.communicate()
    (stage,) = tmp_path.glob(".out.stage-*")
    rec = json.loads((stage / "units" / "000001.json").read_text())
    with open(stage / rec["file"], "r+b") as fh:
        fh.seek(rec["start"])
        fh.write(b"\xff\xff")
    rerun = _cli(recipe, out)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    k = int(next(x for x in err.splitlines() if x.startswith("resuming: ")).split()[1].split("/")[0])
    assert k >= 4
    assert files(out) == files(reference)


def test_another_recipe_never_reuses_staged_units(medium, tmp_path):
    """A staging left by a killed merge of recipe A is not reused by recipe B (another key): B's
    output equals a fresh merge, and A's staging is removed."""
    recipe_a = write_recipe(tmp_path / "a.yaml", metagpt(medium))
    out = tmp_path / "out"
    proc = _cli(recipe_a, out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any((s / "units").glob("*.json") for s in tmp_path.glob(".out.stage-*")):
            proc.kill()
            break
        time.sleep(0.002)
    proc.communicate()
    stale = list(tmp_path.glob(".out.stage-*"))
    assert len(stale) == 1
    recipe_b = write_recipe(tmp_path / "b.yaml", metagpt(medium, medium["models"][:2]))
    rerun = _cli(recipe_b, out)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "resuming" not in err, err
    one_worker(metagpt(medium, medium["models"][:2]), tmp_path / "fresh")
    assert files(out) == files(tmp_path / "fresh") and not stale[0].exists()


def test_second_merge_hashes_and_norms_nothing_and_a_changed_file_is_seen(medium, tmp_path, monkeypatch):
    from metamerge import engine, refs

    monkeypatch.setenv("METAMERGE_CACHE_DIR", str(tmp_path / "cache"))
    models = [str(derive(Path(r), tmp_path / f"m{i}")) for i, r in enumerate([medium["base"], *medium["models"]])]
    m = {"base": models[0], "models": models[1:]}
    hashed, normed = [], []
    real_hash, real_norm = refs.sha256_file, engine.run_norm_unit
    monkeypatch.setattr(refs, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(engine, "run_norm_unit", lambda u: normed.append(u.entries) or real_norm(u))

    first = one_worker(metagpt(m), tmp_path / "o1")
    assert hashed and normed == [(0, 1, 2)]
    hashed.clear()
    normed.clear()
    second = one_worker(metagpt(m), tmp_path / "o2")
    assert hashed == [] and normed == []  # warm: no input hashed, no norm computed
    assert files(tmp_path / "o1") == files(tmp_path / "o2")
    assert first.provenance["inputs"] == second.provenance["inputs"]

    # one more fine-tune costs its own norm pass only
    extra = str(derive(Path(medium["models"][0]), tmp_path / "m4", lambda s: s.update(
        {k: (v.float() * 1.01).to(v.dtype) for k, v in s.items()})))
    one_worker(metagpt(m, [*m["models"], extra]), tmp_path / "o3")
    assert normed == [(3,)]

    # same size, new content, new mtime: its hash and its norms are computed again
    ft = Path(m["models"][1])
    state = load_state(ft)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name] * 2
    size = sum(p.stat().st_size for p in ft.glob("*.safetensors"))
    write_state(ft, state)
    assert sum(p.stat().st_size for p in ft.glob("*.safetensors")) == size
    hashed.clear()
    normed.clear()
    changed = one_worker(metagpt(m), tmp_path / "o4")
    assert any(Path(p).parent == ft for p in hashed) and normed == [(1,)]
    assert changed.report.coefficients != first.report.coefficients
    monkeypatch.setenv("METAMERGE_CACHE_DIR", str(tmp_path / "cold"))
    cold = one_worker(metagpt(m), tmp_path / "o5")
    assert cold.report.coefficients == changed.report.coefficients and files(tmp_path / "o5") == files(tmp_path / "o4")


def test_hub_cache_files_are_never_hashed(tmp_path):
    blob = tmp_path / "hub" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    link = tmp_path / "hub" / "snapshots" / "c0ffee" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert cache.file_sha256(link, lambda p: pytest.fail("hashed a hub blob")) == "ab" * 32


def test_a_worker_that_cannot_see_a_path_says_which_worker_and_which_path(medium, tmp_path):
    from metamerge import units
    from metamerge.refs import ResolvedModel
    from metamerge.staging import UnitRange

    missing = tmp_path / "not-mounted" / "base"
    spec = units.MergeSpec(key="k", run="r", recipe=None, device="cpu", allow_pickle=False,
                           resolved={"base": ResolvedModel("base", missing, "x", "local")})
    with pytest.raises(MergeError) as info:
        units.run_merge_unit(units.MergeUnit(spec, UnitRange(0, "model.safetensors", ("a",), 0, 1), str(tmp_path), None))
    msg = str(info.value)
    assert msg.startswith(f"process {os.getpid()} on {socket.gethostname()} cannot see {missing}")
    assert "every worker" in msg and "\n" not in msg


def test_units_set_torch_threads_in_the_thread_that_runs_them():
    """A Dask worker runs units on its own threads, where a setting made by another thread does not
    apply (OpenMP keeps it per thread): the executors hand out each unit wrapped in ``WithThreads``,
    which sets the count where the unit runs. In this process (one worker) nothing is changed."""
    import threading

    import torch

    from metamerge.executors import ExecutorConfig, WithThreads, run_units

    seen: list[int] = []

    def worker_thread():
        torch.set_num_threads(2)  # what a thread that used torch before the worker was set up sees
        seen.append(WithThreads(lambda _: torch.get_num_threads(), 1)(None))

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join()
    assert seen == [1]
    before = torch.get_num_threads()
    assert run_units(lambda _: torch.get_num_threads(), [0, 1], ExecutorConfig(n_workers=1)) == [before] * 2


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Llama whose embedding and head (20000 x 128 = 2.56M entries) are merged in chunks."""
    root = tmp_path_factory.mktemp("wide")
    cfg = LlamaConfig(vocab_size=20000, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "base")
    for k in range(2):
        g = torch.Generator().manual_seed(7 + k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * (k + 1))
        model.save_pretrained(root / f"ft{k}")
    return {"base": str(root / "base"), "models": [str(root / "ft0"), str(root / "ft1")]}


@pytest.mark.parametrize("method", ["metagpt", "task_arithmetic"])
def test_large_tensors_merged_in_chunks_give_the_bytes_and_report_of_the_whole(method, wide, tmp_path, monkeypatch):
    from metamerge import tensor_merge
    from metamerge.engine import open_inputs

    recipe = metagpt(wide) if method == "metagpt" else {
        "merge_method": "task_arithmetic", "base_model": wide["base"], "parameters": {"lambda": 0.7},
        "models": [{"model": r, "parameters": {"weight": w}} for r, w in zip(wide["models"], (1.0, 0.5))]}
    inputs = open_inputs(parse_recipe(recipe), MergeOptions(), None)
    assert tensor_merge.chunked(inputs, "model.embed_tokens.weight")
    chunked = one_worker(recipe, tmp_path / "chunked")
    monkeypatch.setattr(tensor_merge, "chunked", lambda inputs, name: False)
    whole = one_worker(recipe, tmp_path / "whole", use_cache=False)
    assert files(tmp_path / "chunked") == files(tmp_path / "whole")
    assert chunked.report.tensors["lm_head.weight"] == whole.report.tensors["lm_head.weight"]
