"""Shared fixtures: tiny real transformers model families, built once per test session.

Each ``tiny_*`` fixture is a :class:`models.Family` (a base and fine-tunes = base + seeded noise),
saved with ``save_pretrained`` in safetensors under the session's temporary directory. Tests must
not modify these directories; derive a copy (``models.derive``) to damage or alter one.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if str(Path(__file__).parent) not in sys.path:  # `models` is importable in any import mode
    sys.path.insert(0, str(Path(__file__).parent))

from models import build_family  # noqa: E402

# The merge core's cache (file hashes, norms): one per test session, never the user's, inherited by
# the CLI subprocesses the tests start.
os.environ["METAMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="metamerge-test-cache-")


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_llama_fp32(tiny_models_root):
    """Llama, float32, untied, three fine-tunes, every model sharded (several files + index)."""
    return build_family(tiny_models_root, "llama_fp32", arch="llama", dtype=torch.float32,
                        shard="10KB", n_finetunes=3, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_bf16(tiny_models_root):
    """Llama, bfloat16, untied, two fine-tunes, one file each, no generation_config.json."""
    return build_family(tiny_models_root, "llama_bf16", arch="llama", dtype=torch.bfloat16,
                        n_finetunes=2, seed=2, generation_config=False)


@pytest.fixture(scope="session")
def tiny_gpt2_tied(tiny_models_root):
    """GPT-2, float32, tied embeddings (only ``transformer.wte.weight`` stored), two fine-tunes."""
    return build_family(tiny_models_root, "gpt2_tied", arch="gpt2", dtype=torch.float32,
                        tied=True, n_finetunes=2, seed=3)


@pytest.fixture(scope="session")
def tiny_llama_tied_head(tiny_models_root):
    """Llama, float32, tied, with ``lm_head.weight`` stored too (equal to the embedding)."""
    return build_family(tiny_models_root, "llama_tied_head", arch="llama", dtype=torch.float32,
                        tied=True, n_finetunes=2, seed=4, explicit_head=True)


@pytest.fixture(scope="session")
def tiny_scenario(tmp_path_factory):
    """The demo's scenario at its ``tiny`` size (trained here, ~40 s), built once for every test that
    needs real fine-tunes of different skills. Copy it before changing anything in it."""
    from scenarios.build import build_scenario

    return build_scenario(tmp_path_factory.mktemp("scenario") / "tiny", size="tiny", seed=0, progress=False)
