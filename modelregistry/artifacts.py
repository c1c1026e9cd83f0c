"""What a registered version holds and where its files are: the merged directory's side files, the
pyfunc model's artifacts, a local path for them, and a check of files against recorded hashes."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

from metamerge.errors import MergeError
from metamerge.refs import sha256_file
from metamerge.report import MergeReport

from .config import RegistryConfig, use_store

MERGED_ARTIFACT = "merged"
REFERENCE_ARTIFACT = "reference"
SIDE_FILES = ("merge_recipe.yaml", "merge_report.json", "provenance.json", "README.md")
MERGE_DIR = "merge"
EVAL_DIR = "eval"


def read_merged_dir(merged_dir: str | Path) -> tuple[Path, MergeReport, dict]:
    """Check ``merged_dir`` is a metamerge output; return (path, report, provenance)."""
    path = Path(merged_dir).absolute()
    if not path.is_dir():
        raise MergeError(f"{path} is not a directory; pass the OUT_DIR of `metamerge merge`")
    missing = [f for f in SIDE_FILES if not (path / f).is_file()]
    if missing:
        raise MergeError(f"{path} lacks {', '.join(missing)}: not a complete `metamerge merge` output")
    try:
        report = MergeReport.load(path)
        provenance = json.loads((path / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as exc:
        raise MergeError(f"{path}: unreadable merge_report.json or provenance.json ({exc})") from None
    return path, report, provenance


def check_files(directory: Path, expected: Mapping[str, str]) -> dict[str, list[str]]:
    """Compare the files of ``directory`` with ``{name: sha256}``: mismatched, missing, extra names."""
    mismatched, missing = [], []
    for name, digest in sorted(expected.items()):
        f = directory / name
        if not f.is_file():
            missing.append(name)
        elif sha256_file(f) != digest:
            mismatched.append(name)
    present = {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()
    extra = sorted(present - set(expected) - {"provenance.json"})
    return {"mismatched": mismatched, "missing": missing, "extra": extra}


def model_files_dir(name: str, version, config: RegistryConfig | None = None,
                    dst: str | Path | None = None) -> Path:
    """A local directory holding the registered Hugging Face files of ``name`` ``version``.

    For a local artifact store this is the registered location itself (nothing copied: do not
    write into it) unless ``dst`` is given; for a remote store the files are downloaded to ``dst``
    (or a new temporary directory). For a version registered by reference it is the referenced
    directory.
    """
    import mlflow

    config = config or RegistryConfig()
    with use_store(config):
        client = config.client()
        uri = client.get_model_version_download_uri(name, str(version))
        local = _local_path(uri)
        if local is None or dst is not None:
            target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="metamerge-model-"))
            target.mkdir(parents=True, exist_ok=True)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                            dst_path=str(target)))
    saved = _pyfunc_artifacts(local)
    if MERGED_ARTIFACT in saved and (local / saved[MERGED_ARTIFACT]).is_dir():
        return local / saved[MERGED_ARTIFACT]
    if REFERENCE_ARTIFACT in saved and (local / saved[REFERENCE_ARTIFACT]).is_file():
        return Path(json.loads((local / saved[REFERENCE_ARTIFACT]).read_text(encoding="utf-8"))["path"])
    raise MergeError(f"'{name}' v{version} holds no merged model files (not registered by metamerge?)")


def _pyfunc_artifacts(model_dir: Path) -> dict[str, str]:
    """``{artifact name: relative path}`` from a pyfunc model's MLmodel file."""
    import yaml

    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8")) or {}
    except OSError:
        return {}
    arts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    return {k: v.get("path", "") for k, v in arts.items() if isinstance(v, dict)}


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return Path(uri)
    return None

