"""Fault suite: clean failure. SIGTERM and SIGINT end a merge with one line; a write past the
file-size limit (``RLIMIT_FSIZE``, the kernel's EFBIG) is one line naming the file, with nothing
left behind; too little free space is refused before any write.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metamerge.errors import MergeError

from models import write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "metamerge.cli", "merge", *args, "--no-progress", "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _open_writer(fifo: Path, proc: subprocess.Popen) -> int:
    """Open the FIFO's write end once the merge has opened its read end (it is then inside the
    command, past the signal set-up, blocked reading the recipe)."""
    deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            time.sleep(0.05)
    raise AssertionError(f"the merge never opened its recipe: {proc.communicate()}")


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_stops_the_merge_with_one_line(tmp_path, sig, status, name):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    proc = _cli(str(fifo), str(tmp_path / "out"))
    fd = _open_writer(fifo, proc)
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == status, err
    assert err.strip() == f"error: stopped by {name}; the output was not written (rerun the same command to resume)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_signals_are_held_through_the_block_then_acted_on():
    from metamerge.errors import signals_deferred

    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecode boundaries, where a Python handler would run
                pass
            reached = True
    assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_while_workers_start_is_one_line_and_leaves_no_stray_worker(tiny_llama_bf16, tmp_path):
    """SIGTERM landing inside a worker's start (the merge waiting for the fork server, which may
    still be importing torch): the stop waits for the start to finish, so no worker is left half
    started (one used to fail with a traceback on the terminal after the merge had exited)."""
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "metagpt", "base_model": str(tiny_llama_bf16.base),
                                                "models": [{"model": m} for m in tiny_llama_bf16.refs]})
    out = tmp_path / "out"
    # the signal is sent from inside the start of the first worker, where the merge waits for its
    # pid (read_signed's first call; later ones read workers' exit codes)
    script = ("import os, signal, sys\n"
              "import multiprocessing.forkserver as fs\n"
              "real = fs.read_signed\n"
              "def stopped_while_starting(fd):\n"
              "    fs.read_signed = real\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(fd)\n"
              "fs.read_signed = stopped_while_starting\n"
              "from metamerge.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "merge", str(recipe), str(out), "--no-progress", "--device",
                           "cpu", "--workers", "2", "--unit-size", "8KB"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == ("error: stopped by SIGTERM; the output was not written (rerun the same command to "
                                   "resume)")
    assert not out.exists()


def test_a_write_past_the_file_size_limit_is_one_line_naming_the_file(tiny_llama_bf16, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "metagpt", "base_model": str(tiny_llama_bf16.base),
                                                "models": [{"model": m} for m in tiny_llama_bf16.refs]})
    out = tmp_path / "out"

    def limit():  # in the child only: 8 KiB per file, the merged weights are ~30 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = _cli(str(recipe), str(out), preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = err.strip()
    assert "\n" not in line and line.startswith(f"error: {tmp_path}/.out.stage-") and "model.safetensors: File too large" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no staging, no lock, no OUT


def test_too_little_free_space_is_refused_before_writing(tmp_path):
    from metamerge.engine import _check_free_space

    with pytest.raises(MergeError, match=r"need .* GB but only .* GB are free there"):
        _check_free_space(tmp_path / "a" / "out", 10**18)
    assert list(tmp_path.iterdir()) == []


HUB_RUNNER = """
import sys
from metamerge import refs
from metamerge.errors import TransientSourceError
refs.HUB_BACKOFF_S = 0.0
try:
    refs.resolve("org/model")
except TransientSourceError as exc:
    print(exc)
"""


def test_a_hub_outage_is_retried_with_backoff(tmp_path):
    import http.server
    import threading

    hits: list[str] = []

    class Unavailable(http.server.BaseHTTPRequestHandler):  # a real (local) hub answering 503
        def _answer(self):
            hits.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
               "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        proc = subprocess.run([sys.executable, "-c", HUB_RUNNER], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    finally:
        server.shutdown()
    assert proc.stdout.strip().endswith("(after 3 attempts)"), proc.stderr
    assert hits.count("/api/models/org/model/revision/main") == 3
