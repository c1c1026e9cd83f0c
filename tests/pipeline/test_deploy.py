"""The deployments as a user runs them: a real ``prefect server``, a process work pool, a worker,
``prefect deploy`` of a prefect.yaml like the shipped one, and the merge deployment run and watched
to completion with Prefect's own CLI (``--watch`` prints the task runs: names must not crash it).

About a minute: the server's first start with a new database is most of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from pipeline_helpers import params_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, deadline_s: float = 180) -> None:
    end = time.monotonic() + deadline_s  # readiness polling, not a timing assertion
    while time.monotonic() < end:
        assert proc.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("prefect server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_pool_worker_deploy_and_run_the_merge(tiny_models, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api,
           "PYTHONPATH": str(REPO), "COLUMNS": "200", "PREFECT_LOGGING_LEVEL": "WARNING"}
    params = params_for(tiny_models, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    merge = next(d for d in shipped["deployments"] if d["name"] == "nightly-merge")
    merge["parameters"] = {"recipe": str(tmp_path / "params.yaml")}
    merge["work_pool"]["name"] = "test-pool"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({**shipped, "deployments": [merge]}))

    def run(*args: str, timeout: int = 300) -> str:
        proc = subprocess.run([*args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=open(logs / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _wait_healthy(api, server)
        assert "ready" in run(sys.executable, "-m", "flows.deployments", str(tmp_path / "prefect.yaml"))
        run(str(BIN / "prefect"), "work-pool", "create", "test-pool", "--type", "process")
        run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool"], env=env,
                                  cwd=REPO, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        out = run(str(BIN / "prefect"), "deployment", "run", "metamerge-merge/nightly-merge", "--watch",
                  "--watch-timeout", "400", timeout=450)
        assert "Completed" in out, out
        listed = run(str(BIN / "prefect"), "task-run", "ls")
        assert "merge" in listed and "compute_norms-ft-a" in listed, listed
        worker_log = (logs / "worker.log").read_text()
        assert "Loading weights" not in worker_log and "it/s]" not in worker_log, worker_log[-3000:]
        assert any(p.name.startswith("tiny-") for p in (tmp_path / "out").iterdir())
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
