"""Run upstream mergekit as the reference implementation for parity checks.

Standard library only: any python (3.8+) can import or run this file.

mergekit lives in its own virtual environment, ``.venv-mergekit`` at the repository
root, so that its dependency pins never touch the project's ``.venv``.
``ensure_mergekit_venv()`` builds it the same way every time:

1. ``python3.11 -m venv .venv-mergekit``
2. ``pip install torch==2.13.0`` FIRST (a CPU wheel lies on disk here; an unpinned
   torch would make pip fetch a multi-GB CUDA build);
3. ``pip install mergekit==0.1.5 torch==2.13.0`` (torch repeated so pip can never
   swap it). No ``--no-deps`` is needed: mergekit 0.1.5 requires ``torch>=2.0``,
   ``transformers>=5.0,<6`` (resolves to 5.23.0, the project's own pin),
   accelerate, peft, datasets (pulls pandas/pyarrow), scipy, sentencepiece, ...

Measured cost on the 2-core CPU machine (PyPI download speed varies): 77-141 s
wall in all over three fresh installs, typically about 110 s (venv about 3 s, torch
30-46 s, mergekit and its dependencies 45-71 s), 1.6 GiB on disk. ``lean=True``
installs ``mergekit --no-deps`` plus only what ``mergekit-yaml`` imports (no
datasets/pandas/pyarrow/scipy, which mergekit never imports): the mergekit step
then took 37 s, 1.2 GiB on disk, identical output (pip prints a harmless
"mergekit requires datasets/scipy" warning). Later calls return at once (a marker
file records the installed specs).
Each ``mergekit-yaml`` run costs about 6-7 s of imports; a tiny 3-model merge
about 8 s in all.

``run_mergekit()`` runs ``mergekit-yaml`` on CPU with a fixed ``--random-seed``
(mergekit seeds python/numpy/torch's global RNGs from it; DARE/DELLA masks are drawn
from torch's global CPU generator, tensor by tensor in sorted tensor-name order, one
``torch.bernoulli`` per non-base model in recipe order), with the Hugging Face hub
offline.

Caveat: mergekit's model card asks the Hub whether a model path is a Hub repo when
the path does not start with ``/``, ``~`` or ``.`` and has at most one ``/``
(e.g. ``base`` or ``models/ft1``). Offline this crashes the run AFTER the weights
were written. Use absolute (or ``./``-prefixed) paths in recipes, or pass
``extra_args=("--no-write-model-card",)``.

Command line::

    python bench/mergekit_runner.py ensure [VENV]
    python bench/mergekit_runner.py run RECIPE.yml OUT_DIR [extra mergekit-yaml args]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

try:  # POSIX only; on other systems the install is simply not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO_ROOT / ".venv-mergekit"
TORCH_SPEC = os.environ.get("METAMERGE_TORCH_SPEC", "torch==2.13.0")
MERGEKIT_SPEC = os.environ.get("METAMERGE_MERGEKIT_SPEC", "mergekit==0.1.5")
# What mergekit 0.1.5's `mergekit-yaml` needs (its Requires-Dist minus datasets and scipy).
LEAN_DEPS = (
    "transformers>=5.0,<6",
    "tokenizers>=0.20.1",
    "safetensors>=0.5.2,<1",
    "accelerate>=1.6.0,<2",
    "pydantic>=2.10.6,<3",
    "immutables>=0.21,<1",
    "click>=8.2.1,<9",
    "tqdm>=4.67.1,<5",
    "huggingface_hub",
    "peft>=0.18.0",
    "typing-extensions",
    "sentencepiece",
    "protobuf",
)
DEFAULT_SEED = 0
_MARKER = ".metamerge-mergekit-installed"

PathLike = Union[str, "os.PathLike[str]"]


class MergekitError(RuntimeError):
    """mergekit-yaml exited non-zero; carries its exit status and output."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr or stdout or "").strip()[-6000:]
        super().__init__(
            f"mergekit-yaml failed with exit status {returncode}\n"
            f"command: {' '.join(self.cmd)}\n--- mergekit stderr (tail) ---\n{tail}"
        )


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def find_mergekit(venv: PathLike | None = None) -> str | None:
    """Path of ``mergekit-yaml``: in ``venv`` (default ``.venv-mergekit``), else on PATH, else None."""
    candidate = _bin(Path(venv) if venv is not None else DEFAULT_VENV, "mergekit-yaml")
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("mergekit-yaml")


def _find_python() -> str:
    for name in ("python3.11", "python3"):
        found = shutil.which(name)
        if found:
            return found
    return sys.executable


def _run_checked(cmd: Sequence[str], env: Mapping[str, str]) -> None:
    proc = subprocess.run(list(cmd), env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{(proc.stderr or proc.stdout)[-6000:]}"
        )


def ensure_mergekit_venv(
    path: PathLike = DEFAULT_VENV,
    *,
    python: str | None = None,
    torch_spec: str = TORCH_SPEC,
    mergekit_spec: str = MERGEKIT_SPEC,
    lean: bool = False,
    verbose: bool = False,
) -> str:
    """Create (idempotently) a venv at ``path`` holding mergekit; return its ``mergekit-yaml``.

    torch is installed first and pinned in every pip call. The first call takes about
    80-140 s (see the module docstring); later calls with the same specs return at once.
    ``lean=True`` skips mergekit's unused heavy dependencies (datasets, scipy).
    Concurrent callers (e.g. parallel test workers) wait on a lock file.
    """
    venv = Path(path).resolve()
    wanted = f"{torch_spec}\n{mergekit_spec}\n" + ("lean\n" if lean else "")
    marker = venv / _MARKER
    mk = _bin(venv, "mergekit-yaml")

    def ready() -> bool:
        try:
            return mk.is_file() and marker.read_text() == wanted
        except OSError:
            return False

    if ready():
        return str(mk)

    venv.mkdir(parents=True, exist_ok=True)  # `python -m venv` accepts an existing empty dir
    with open(venv / ".install.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if ready():
                return str(mk)
            start = time.monotonic()
            env = dict(os.environ)
            env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            py = _bin(venv, "python")
            steps = []
            if not py.exists():
                steps.append([python or _find_python(), "-m", "venv", str(venv)])
            pip = [str(py), "-m", "pip", "install", "-q"]
            steps.append(pip + [torch_spec])  # torch first, pinned
            if lean:
                steps.append(pip + ["--no-deps", mergekit_spec])
                steps.append(pip + [torch_spec, *LEAN_DEPS])
            else:  # torch repeated so pip can never swap it
                steps.append(pip + [mergekit_spec, torch_spec])
            for cmd in steps:
                t0 = time.monotonic()
                _run_checked(cmd, env)
                if verbose:
                    print(f"  {time.monotonic() - t0:5.1f} s  {' '.join(cmd[-2:])}")
            if not mk.is_file():
                raise RuntimeError(f"mergekit installed but {mk} is missing")
            marker.write_text(wanted)
            if verbose:
                print(f"mergekit venv ready at {venv} in {time.monotonic() - start:.0f} s")
            return str(mk)
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def mergekit_env(extra: Mapping[str, str] | None = None) -> dict:
    """Environment for a quiet, offline, CPU-only mergekit run."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    # The project's venv must not leak into mergekit's interpreter.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    if extra:
        env.update(extra)
    return env


def run_mergekit(
    recipe_path: PathLike,
    out_dir: PathLike,
    extra_args: Iterable[str] = (),
    *,
    mergekit_yaml: str | None = None,
    seed: int | None = DEFAULT_SEED,
    cwd: PathLike | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``mergekit-yaml RECIPE OUT_DIR`` on CPU; raise MergekitError with its stderr on failure.

    Always passes ``--no-cuda --device cpu --random-seed SEED --quiet`` (``seed=None``
    omits the seed) before ``extra_args``, so later flags in ``extra_args`` win.
    Relative model paths in the recipe resolve against ``cwd`` (default: this process's
    working directory). Returns the CompletedProcess (stdout/stderr as text).
    """
    mk = mergekit_yaml or find_mergekit()
    if mk is None:
        raise FileNotFoundError(
            "mergekit-yaml not found; call bench.mergekit_runner.ensure_mergekit_venv() first"
        )
    cmd = [mk, str(recipe_path), str(out_dir), "--no-cuda", "--device", "cpu", "--quiet"]
    if seed is not None:
        cmd += ["--random-seed", str(int(seed))]
    cmd += [str(a) for a in extra_args]
    try:
        proc = subprocess.run(
            cmd,
            cwd=str(cwd) if cwd is not None else None,
            env=mergekit_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise MergekitError(cmd, -9, out, f"timed out after {timeout} s\n{err}") from exc
    if proc.returncode != 0:
        raise MergekitError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("ensure", "run"):
        print(__doc__)
        return 2
    if argv[0] == "ensure":
        start = time.monotonic()
        lean = "--lean" in argv
        rest = [a for a in argv[1:] if a != "--lean"]
        mk = ensure_mergekit_venv(rest[0] if rest else DEFAULT_VENV, lean=lean, verbose=True)
        print(f"{mk} ({time.monotonic() - start:.1f} s)")
        return 0
    if len(argv) < 3:
        print("usage: mergekit_runner.py run RECIPE.yml OUT_DIR [extra args]")
        return 2
    start = time.monotonic()
    try:
        run_mergekit(argv[1], argv[2], argv[3:])
    except MergekitError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"merged into {argv[2]} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
