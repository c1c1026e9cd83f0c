"""Audit a registered version (full provenance + file verification) and reproduce it bit for bit.

Chain of trust checked by :func:`audit`
    the version's ``provenance_sha256`` tag (in the tracking database)
      -> the run's ``merge/provenance.json`` (hashes to that tag, else it was altered)
        -> its ``outputs`` (sha256 of every file the merge wrote)
          -> the registered files (``artifacts/merged/`` of the registered model, read in place
             for a local artifact store, downloaded otherwise; the referenced directory for a
             version registered by reference).

:func:`reproduce` re-runs the merge from the recorded recipe (``merge_recipe.yaml``, checked
against the recorded recipe hash) with every input checked against its recorded revision: a local
directory must hash to the recorded content hash (the files that changed are named), a hub model is
fetched at the recorded commit. Then it compares every output file with the recorded hashes.
Bit-identity of the weights needs the same device type and library versions; both are recorded and
differences are reported.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from metamerge.errors import MergeError
from metamerge.refs import sha256_file
from metamerge.shapes import nbytes

from .artifacts import MERGE_DIR, MERGED_ARTIFACT, _local_path, check_files, model_files_dir
from .config import RegistryConfig, use_store
from .lineage import git_commit
from .promotion import TAG

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
MERGE_METRIC_PREFIXES = ("lambda.", "coefficient.", "task_vector_norm.")
PROJECT_TAGS = ("git_commit", "dvc_lock_sha256", "prefect_flow_run_id")


def _mlflow_error(exc) -> MergeError:
    msg = str(getattr(exc, "message", exc)).strip().splitlines()
    return MergeError(msg[0] if msg else type(exc).__name__)


def _version_and_run(client, name: str, version):
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise MergeError(f"registered model '{name}' has no version {version}") from None
    try:
        run = client.get_run(mv.run_id)
    except MlflowException:
        raise MergeError(f"'{name}' v{version}: its run {mv.run_id} is gone; nothing to audit") from None
    return mv, run


def _recorded(mv, run, dst: Path) -> tuple[dict, str | None, bool]:
    """Download the run's provenance.json and recipe; return (provenance, recipe text, hash ok)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=MERGE_DIR,
                                                         dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise MergeError(f"cannot read the recorded merge files of run {run.info.run_id}: {_mlflow_error(exc)}") from None
    prov_file = local / "provenance.json"
    if not prov_file.is_file():
        raise MergeError(f"run {run.info.run_id} has no {MERGE_DIR}/provenance.json; not a metamerge registration")
    expected = mv.tags.get("provenance_sha256") or run.data.tags.get("provenance_sha256")
    ok = expected is not None and sha256_file(prov_file) == expected
    provenance = json.loads(prov_file.read_text(encoding="utf-8"))
    recipe_file = local / "merge_recipe.yaml"
    text = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else None
    return provenance, text, ok


def _group_metrics(metrics: Mapping[str, float]) -> tuple[dict, dict, dict]:
    scores: dict[str, dict[str, float]] = {}
    summary, merge = {}, {}
    for k, v in sorted(metrics.items()):
        if k.startswith(MERGE_METRIC_PREFIXES):
            merge[k] = v
        elif "." in k:
            task, metric = k.rsplit(".", 1)
            scores.setdefault(task, {})[metric] = v
        else:
            summary[k] = v
    return scores, summary, merge


def audit(name: str, version, config: RegistryConfig | None = None) -> dict[str, Any]:
    """Full provenance of ``name`` ``version`` and whether its registered files are intact.

    ``verified`` is true when the recorded provenance.json is unaltered and every file it lists
    exists in the registered location with the recorded sha256; ``verification`` names the files
    that are ``mismatched`` or ``missing`` (and ``extra`` files nobody recorded).
    """
    config = config or RegistryConfig()
    with use_store(config), tempfile.TemporaryDirectory(prefix="metamerge-audit-") as tmp:
        client = config.client()
        mv, run = _version_and_run(client, name, version)
        provenance, recipe_text, prov_ok = _recorded(mv, run, Path(tmp))
        outputs = provenance.get("outputs") or {}
        by_ref = mv.tags.get("registered_by_reference") == "true"
        try:
            files_dir = model_files_dir(name, mv.version, config, dst=None if _local_path(
                client.get_model_version_download_uri(name, mv.version)) else Path(tmp) / "model")
        except MergeError as exc:
            files_dir, check = None, {"mismatched": [], "missing": sorted(outputs), "extra": [], "error": str(exc)}
        else:
            check = check_files(files_dir, outputs)
            registered_prov = files_dir / "provenance.json"
            if registered_prov.is_file() and sha256_file(registered_prov) != mv.tags.get("provenance_sha256"):
                check["mismatched"].append("provenance.json")
        verified = bool(prov_ok and not check["mismatched"] and not check["missing"])
        scores, summary, merge_metrics = _group_metrics(run.data.metrics)
        tags = dict(mv.tags)
        return {
            "name": name,
            "version": str(mv.version),
            "aliases": sorted(getattr(mv, "aliases", []) or []),
            "run_id": mv.run_id,
            "source": mv.source,
            "registered_files": str(files_dir) if files_dir else None,
            "registered_by_reference": by_ref,
            "created": mv.creation_timestamp,
            "recipe": provenance.get("recipe"),
            "recipe_sha256": provenance.get("recipe_sha256"),
            "recipe_text": recipe_text,
            "inputs": [{k: item.get(k) for k in ("role", "ref", "revision", "source", "path", "files")}
                       for item in provenance.get("inputs", [])],
            "tokenizer_source": provenance.get("tokenizer_source"),
            "project": {k: tags.get(k) for k in PROJECT_TAGS},
            "lineage": {k[len("lineage."):]: v for k, v in tags.items() if k.startswith("lineage.")},
            "params": dict(run.data.params),
            "scores": scores,
            "summary": summary,
            "merge_metrics": merge_metrics,
            "promotion": {k[len(TAG):]: v for k, v in sorted(tags.items()) if k.startswith(TAG)},
            "versions": provenance.get("versions"),
            "device": provenance.get("device"),
            "verification": {"verified": verified, "provenance_sha256_ok": prov_ok, "checked": len(outputs), **check},
            "verified": verified,
        }


def format_audit(report: Mapping[str, Any]) -> str:
    """Human-readable audit."""
    v = report["verification"]
    lines = [f"{report['name']} v{report['version']}"
             + (f"  [{', '.join(report['aliases'])}]" if report["aliases"] else ""),
             f"  run:        {report['run_id']}",
             f"  files:      {report['registered_files']}" + ("  (by reference)" if report["registered_by_reference"] else ""),
             f"  recipe:     {report['recipe_sha256']}  method {(report.get('recipe') or {}).get('merge_method')}",
             f"  project:    commit {report['project'].get('git_commit')}  dvc.lock {report['project'].get('dvc_lock_sha256') or '-'}"
             f"  flow run {report['project'].get('prefect_flow_run_id') or '-'}",
             f"  built with: {json.dumps(report.get('versions'))} on {report.get('device')}",
             "  inputs:"]
    for item in report["inputs"]:
        lines.append(f"    {item['role']:<5} {item['ref']}  @{item['revision']}  ({item['source']}, {len(item.get('files') or {})} files)")
        for fname, digest in sorted((item.get("files") or {}).items()):
            lines.append(f"            {digest}  {fname}")
    if report["summary"] or report["scores"]:
        lines.append("  scores:")
        for k, val in report["summary"].items():
            lines.append(f"    {k} = {val:.6g}")
        for task, ms in report["scores"].items():
            lines.append(f"    {task}: " + ", ".join(f"{m}={x:.6g}" for m, x in ms.items()))
    if report["promotion"]:
        lines.append("  promotion:")
        for k, val in report["promotion"].items():
            lines.append(f"    {k}: {val}")
    status = "VERIFIED" if v["verified"] else "NOT VERIFIED"
    lines.append(f"  files check: {status} ({v['checked']} recorded files"
                 + ("" if v["provenance_sha256_ok"] else "; recorded provenance.json was altered") + ")")
    for kind in ("mismatched", "missing", "extra"):
        if v.get(kind):
            lines.append(f"    {kind}: {', '.join(v[kind])}")
    if v.get("error"):
        lines.append(f"    error: {v['error']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reproduce
# ---------------------------------------------------------------------------------------------


def _pin_input(item: Mapping[str, Any], override: str | None):
    """Resolve one recorded input and check it against the recorded revision."""
    from metamerge.refs import ModelRef, resolve

    ref, recorded = item["ref"], item.get("revision")
    if item.get("source") == "hub" and not override:
        r = resolve(f"{ModelRef.parse(ref).name}@{recorded}")
        where = f"hub commit {recorded}"
    else:
        path = override or (item.get("path") if item.get("path") and Path(item["path"]).is_dir()
                            else ModelRef.parse(ref).name)
        if not Path(path).expanduser().is_dir():
            raise MergeError(f"input '{ref}': no directory at {path}; pass its location (--input REF=PATH)")
        r = resolve(str(Path(path).expanduser().absolute()))
        where = str(r.path)
    recorded_files = item.get("files") or {}
    changed = sorted(n for n in set(recorded_files) | set(r.files) if recorded_files.get(n) != r.files.get(n))
    if (item.get("source") != "hub" or override) and r.revision != recorded:
        raise MergeError(f"input '{ref}' at {where}: content hash {r.revision[:12]} differs from the recorded "
                         f"{str(recorded)[:12]} (changed: {', '.join(changed) or 'unknown'}); restore the recorded files")
    if recorded_files and changed:
        raise MergeError(f"input '{ref}' at {where}: files differ from the recorded hashes ({', '.join(changed)})")
    return replace(r, ref=ref)  # an adapter stays one (its base comes from the recipe)


def _recorded_recipe(provenance: Mapping[str, Any], text: str | None):
    import yaml

    from metamerge.recipe import parse_recipe

    want = provenance.get("recipe_sha256")
    if text is not None:
        try:
            recipe = parse_recipe(yaml.safe_load(text), "recorded merge_recipe.yaml")
        except (MergeError, yaml.YAMLError):
            recipe = None
        if recipe is not None and (want is None or recipe.sha256() == want):
            return recipe, text
    recipe = parse_recipe(provenance.get("recipe"), "recorded provenance recipe")
    if want is not None and recipe.sha256() != want:
        raise MergeError(f"the recorded recipe does not hash to the recorded recipe_sha256 {want[:12]}")
    return recipe, text


def _shard_size(plan, index: Mapping[str, Any]) -> int:
    """The smallest max_shard_size that reproduces a recorded shard layout (greedy writer)."""
    totals: dict[str, int] = {}
    for name, fname in index.get("weight_map", {}).items():
        totals[fname] = totals.get(fname, 0) + nbytes(plan.out_shapes[name], plan.out_dtypes[name])
    return max(totals.values())


def _registered_index(client, name: str, version: str, config: RegistryConfig, outputs, dst: Path) -> dict | None:
    fname = "model.safetensors.index.json"
    if fname not in outputs:
        return None
    import mlflow

    uri = client.get_model_version_download_uri(name, version)
    path = None
    if _local_path(uri) is None:
        try:
            path = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri.rstrip('/')}/artifacts/{MERGED_ARTIFACT}/{fname}", dst_path=str(dst)))
        except Exception:
            path = None
    if path is None:
        path = model_files_dir(name, version, config) / fname
    if not path.is_file() or sha256_file(path) != outputs[fname]:
        raise MergeError(f"'{name}' v{version}: the registered shard index is missing or altered; "
                         "pass max_shard_size explicitly")
    return json.loads(path.read_text(encoding="utf-8"))


def reproduce(name: str, version, out_dir: str | Path, config: RegistryConfig | None = None, *,
              inputs: Mapping[str, str] | None = None, device: str | None = None,
              max_shard_size: str | int | None = None) -> dict[str, Any]:
    """Re-run the recorded merge of ``name`` ``version`` into ``out_dir`` and compare every file.

    ``inputs`` maps a recorded reference to where it lives now (default: the recorded path, then
    the reference itself). Returns ``{"identical": bool (every weight file bit-identical),
    "all_files_identical": bool, "files": {name: {"recorded", "reproduced", "identical"}}, ...}``.
    """
    import torch

    from metamerge.engine import MergeOptions, merge

    config = config or RegistryConfig()
    overrides = dict(inputs or {})
    with use_store(config), tempfile.TemporaryDirectory(prefix="metamerge-reproduce-") as tmp:
        client = config.client()
        mv, run = _version_and_run(client, name, version)
        provenance, recipe_text, prov_ok = _recorded(mv, run, Path(tmp))
        if not prov_ok:
            raise MergeError(f"'{name}' v{mv.version}: the recorded provenance.json was altered "
                             "(its hash differs from the version's provenance_sha256 tag)")
        outputs = provenance.get("outputs") or {}
        recipe, recipe_text = _recorded_recipe(provenance, recipe_text)
        resolved = {item["ref"]: _pin_input(item, overrides.get(item["ref"])) for item in provenance.get("inputs", [])}
        notes = []
        dev = device or provenance.get("device") or "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            notes.append("recorded on cuda, reproduced on cpu: weights may differ in the last bits")
            dev = "cpu"
        versions = provenance.get("versions") or {}
        now = {"torch": torch.__version__.split("+")[0]}
        from metamerge import __version__

        now["metamerge"] = __version__
        for k, v in now.items():
            if versions.get(k) and versions[k] != v:
                notes.append(f"{k} {v} here, {versions[k]} when recorded")
        recorded_commit, commit = mv.tags.get("git_commit"), git_commit()
        if recorded_commit and recorded_commit != "unknown" and commit and commit != recorded_commit:
            notes.append(f"project commit {commit[:12]} here, {recorded_commit[:12]} when recorded: "
                         "a change in the merge code can change the result")
        options = MergeOptions(device=dev, progress=False)
        if max_shard_size is not None:
            options.max_shard_size = max_shard_size
        else:
            index = _registered_index(client, name, str(mv.version), config, outputs, Path(tmp) / "index")
            if index is not None:
                plan = merge(recipe, None, options, resolved=resolved, dry_run=True).plan
                options.max_shard_size = _shard_size(plan, index)
    result = merge(recipe, out_dir, options, resolved=resolved, recipe_text=recipe_text)
    produced = result.provenance.get("outputs") or {}
    files = {}
    for fname in sorted(set(outputs) | set(produced)):
        files[fname] = {"recorded": outputs.get(fname), "reproduced": produced.get(fname),
                        "identical": outputs.get(fname) is not None and outputs.get(fname) == produced.get(fname)}
    weights = {f: v for f, v in files.items() if f.endswith(WEIGHT_SUFFIXES)}
    identical = bool(weights) and all(v["identical"] for v in weights.values())
    tensors: list[dict[str, Any]] = []
    cause = None
    if not identical:
        from .compare import likely_cause, tensor_differences

        try:
            tensors = tensor_differences(model_files_dir(name, str(mv.version), config), out_dir)
        except (OSError, MergeError, RuntimeError) as exc:  # the registered files are not readable here
            notes.append(f"could not compare tensors with the registered files ({exc})")
        cause = likely_cause(notes, tensors)
    return {
        "name": name, "version": str(mv.version), "out_dir": str(Path(out_dir).absolute()),
        "identical": identical,
        "differing_tensors": tensors, "likely_cause": cause,
        "all_files_identical": all(v["identical"] for v in files.values()),
        "weights": sorted(weights),
        "differing": sorted(f for f, v in files.items() if not v["identical"]),
        "files": files, "device": dev, "notes": notes,
        "inputs": {ref: r.revision for ref, r in resolved.items()},
    }
