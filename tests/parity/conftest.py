"""Parity fixtures: the three architectures, built once per session. Skipped, with the reason,
when the mergekit venv is missing (``make test`` builds it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from parity_helpers import ARCHS, MERGEKIT, build_models  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if MERGEKIT is None:
        skip = pytest.mark.skip(reason="mergekit venv missing: run `make test` (it builds .venv-mergekit)")
        for item in items:
            if "tests/parity" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def parity_root(tmp_path_factory):
    return tmp_path_factory.mktemp("parity_models")


@pytest.fixture(scope="session", params=ARCHS)
def arch_models(request, parity_root):
    """``(arch, {"base": path, "ft0".."ft2": paths})`` for each architecture in turn."""
    return request.param, build_models(parity_root, request.param)


@pytest.fixture(scope="session")
def all_arch_models(parity_root):
    return {arch: build_models(parity_root / "all", arch) for arch in ARCHS}
