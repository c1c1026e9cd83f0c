"""Register a merged model directory in MLflow: one run, a new registered version, then the gate.

Registration choice: a pyfunc model logged with MLflow 3's *models from code*
(``python_model=modelregistry/pyfunc_model.py``), with the merged directory as its ``merged``
artifact. Why not ``mlflow.transformers.log_model``: it re-saves the weights through transformers
(so the registered files no longer hash to what ``provenance.json`` recorded, and ``audit`` could
not verify them) and needs an explicit ``pip_requirements`` to avoid importing torchvision. Why not
a pickled ``PythonModel``: MLflow 3 refuses to unpickle models unless
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is set. The code file is copied into the model, imports only
mlflow/torch/transformers, and its ``load_context`` loads the directory with
``AutoModelForCausalLM``/``AutoTokenizer``. So::

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(["a prompt"], params={"max_new_tokens": 16})   # -> ["continuation"]

and the exact Hugging Face directory (bit-identical files) is under the version's artifacts at
``artifacts/merged/`` (:func:`model_files_dir` gives a local path to it).

MLflow's fluent API (runs, ``log_model``) uses a process-wide tracking URI: each call points it at
``config``'s store for its duration (``config.use_store``) and restores it after, so do not
register into two different stores from two threads of one process at the same time.

With ``RegistryConfig.register_by_reference`` only a JSON pointer (absolute path + sha256 of every
file) is logged as the ``reference`` artifact; see ``config.py``.

What one call of :func:`register_merge` records in its run
    params   method, granularity, base, n_models, model.<i> (refs), recipe_sha256, dtype,
             out_dtype, tokenizer_source, parameter.<key> (recipe parameters), input.<i>.revision
    metrics  <task>.<metric> for every number in ``scores[task]`` (exact_match, loss, perplexity,
             ...), <task>.normalized_score, <task>.loss_difference, ald, mean_normalized_score,
             other numbers of ``summary``, lambda.<i> / coefficient.<i>, task_vector_norm.<i>
    tags     content_sha256 (the merged weights, see :func:`content_sha256`), git_commit, git_dirty,
             dvc_lock_sha256, prefect_flow_run_id, recipe_sha256, provenance_sha256,
             input.<i>.{role,ref,revision,source,files_sha256,files}, lineage.<other caller keys>
             (the same tags go on the registered version)
    artifacts merge/{merge_recipe.yaml, merge_report.json, provenance.json, README.md,
             model_card.md (with scores), lineage.json}, eval/scores.json, eval/<extra artifacts>
    model    the pyfunc model above, registered as a new version of ``config.model_name`` whose
             description is the model card; then ``promotion.apply_gate``.

No duplicates: a version is keyed by its ``content_sha256`` tag. Registering weights that a version
of the same registered model already holds (another output path, a rerun, a retry after a crash
between ``register_model`` and the gate) logs nothing and returns that version, with
``duplicate=True`` and the decision recorded on it; a changed eval setting therefore never makes a
second version of unchanged weights.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from metamerge.errors import MergeError
from metamerge.refs import sha256_file
from metamerge.report import MergeReport

from .artifacts import (
    EVAL_DIR,
    MERGE_DIR,
    MERGED_ARTIFACT,
    REFERENCE_ARTIFACT,
    SIDE_FILES,
    check_files,
    read_merged_dir,
)
from .config import RegistryConfig, use_store
from .lineage import files_digest, lineage_tags
from .metrics import number, report_params, score_metrics
from .promotion import CHAMPION, TAG, PromotionDecision, apply_gate

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME_IN_RUN = "model"
MAX_DESCRIPTION = 5000
PIP_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")
REPRODUCE = "metamerge-registry reproduce {name} {version} OUT_DIR --tracking-uri {uri}   # checks inputs, bit-identity"


@dataclass
class RegistrationResult:
    """Where the merge was recorded and what the gate decided."""

    model_name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    run_id: str
    experiment_id: str
    model_id: str | None
    artifact_uri: str  # the run's artifact root
    by_reference: bool
    decision: PromotionDecision
    tags: dict[str, str] = field(default_factory=dict)
    duplicate: bool = False  # the weights were already registered: this is that version

    @property
    def promoted(self) -> bool:
        return self.decision.promoted

    def to_dict(self) -> dict:
        return asdict(self)


def _model_card(provenance: Mapping[str, Any], report: MergeReport, scores, fallback: str, reproduce: str) -> str:
    """The merge's model card re-rendered with the scores and the registry's reproduce command
    (falls back to the README as merged)."""
    try:
        from metamerge.modelcard import render_model_card

        recipe_d = provenance.get("recipe") or {}
        recipe = SimpleNamespace(name=recipe_d.get("name"), merge_method=recipe_d.get("merge_method", report.method))
        ins = [SimpleNamespace(ref=i.get("ref"), revision=i.get("revision")) for i in provenance.get("inputs", [])]
        base = next((SimpleNamespace(ref=i.ref, revision=i.revision) for i, d in
                     zip(ins, provenance.get("inputs", [])) if d.get("role") == "base"), None)
        models = [i for i, d in zip(ins, provenance.get("inputs", [])) if d.get("role") == "model"]
        table = {t: {k: v for k, v in (m or {}).items() if v is None or number(v) is not None}
                 for t, m in (scores or {}).items()}
        return render_model_card(recipe, report, SimpleNamespace(base=base, models=models), scores=table or None,
                                 reproduce=reproduce)
    except Exception:  # the card is documentation: never fail a registration over it
        return fallback


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def content_sha256(outputs: Mapping[str, str]) -> str:
    """The merged weights' identity: sha256 over (name, sha256) of the weight files and config.json.

    Side files (README, report, recipe) are left out on purpose: they name paths and recipe text, so
    the same weights merged from another folder or an equivalent recipe would otherwise differ.
    """
    files = {n: h for n, h in outputs.items() if n.endswith(WEIGHT_SUFFIXES) or n == "config.json"}
    if not any(n.endswith(".safetensors") for n in files):
        raise MergeError("provenance.json lists no .safetensors output: not a complete `metamerge merge` output")
    return files_digest(files)


def find_registered(client, model_name: str, content: str):
    """The oldest version of ``model_name`` tagged with ``content_sha256 == content``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.content_sha256 = '{content}'")
    except MlflowException:  # no such registered model yet
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def _existing_result(client, config: RegistryConfig, mv) -> RegistrationResult:
    """The result of a registration that already happened (its run, its recorded gate decision)."""
    tags = dict(mv.tags or {})
    run = client.get_run(mv.run_id)
    recorded = tags.get(TAG + "decision")
    if recorded:
        decision = PromotionDecision(config.model_name, str(mv.version), recorded,
                                     f"already registered: {tags.get(TAG + 'reason', '')}",
                                     tags.get(TAG + "previous_champion") or None, _alias(client, config, CHAMPION),
                                     by=tags.get(TAG + "by", "gate"))
    else:  # registered, but the gate never ran (a crash in between): run it now
        decision = apply_gate(config.model_name, mv.version, config, client)
    return RegistrationResult(config.model_name, str(mv.version), f"models:/{config.model_name}/{mv.version}",
                              run.info.run_id, run.info.experiment_id, None, run.info.artifact_uri,
                              tags.get("registered_by_reference") == "true", decision, tags, duplicate=True)


def _alias(client, config: RegistryConfig, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(config.model_name, alias).version)
    except MlflowException:
        return None


def pip_requirements(adapter: bool = False) -> list[str]:
    """Pinned requirements of the pyfunc model (given explicitly: inference would load the model);
    ``adapter``: a LoRA adapter, which loads with peft."""
    out = []
    for pkg in PIP_PACKAGES + (("peft",) if adapter else ()):
        try:
            out.append(f"{pkg}=={metadata.version(pkg).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(pkg)
    return out


def _signature(config: RegistryConfig):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", config.max_new_tokens),
                            ParamSpec("do_sample", "boolean", False),
                            ParamSpec("temperature", "double", 1.0)]))


def _log_extra(mlflow, paths: Iterable[str | Path]) -> None:
    for p in paths:
        p = Path(p)
        if p.is_dir():
            mlflow.log_artifacts(str(p), f"{EVAL_DIR}/{p.name}")
        elif p.is_file():
            mlflow.log_artifact(str(p), EVAL_DIR)
        else:
            raise MergeError(f"extra artifact {p} does not exist")


def register_merge(merged_dir: str | Path, scores: Mapping[str, Mapping[str, Any]] | None,
                   summary: Mapping[str, Any] | None, lineage: Mapping[str, Any] | None,
                   config: RegistryConfig | None = None, extra_artifacts: Iterable[str | Path] = (),
                   *, run_name: str | None = None, verify: bool = True, gate: bool = True) -> RegistrationResult:
    """Log a merged directory, its scores and lineage in one MLflow run, register it, run the gate.

    ``scores``  ``{task: {"exact_match": float|None, "loss": float, "normalized_score"?: ..., ...}}``
    ``summary`` ``{"mean_normalized_score": float|None, "ald": float|None, "normalized_scores"?:
                {task: float|None}, ...}`` (``evaluation.summarize`` output is accepted too)
    ``lineage`` ``{"git_commit"?, "dvc_lock_sha256"? or "dvc_lock"? (a path), "prefect_flow_run_id"?,
                ...}``; other keys become ``lineage.<key>`` tags. The commit is read from the
                project's ``.git`` when not given.
    ``verify``  first check the directory's files against its ``provenance.json`` (refuses a
                directory changed after the merge).
    ``gate``    run ``promotion.apply_gate`` on the new version (else only register it).
    """
    import mlflow

    config = config or RegistryConfig()
    path, report, provenance = read_merged_dir(merged_dir)
    outputs = provenance.get("outputs") or {}
    if verify:
        bad = check_files(path, outputs)
        if bad["mismatched"] or bad["missing"]:
            raise MergeError(f"{path} no longer matches its provenance.json (changed: "
                             f"{', '.join(bad['mismatched'] + bad['missing'])}); merge again")
    prov_sha = sha256_file(path / "provenance.json")
    content = content_sha256(outputs)
    with use_store(config):
        client = config.client()
        if (existing := find_registered(client, config.model_name, content)) is not None:
            return _existing_result(client, config, existing)
    tags = lineage_tags(lineage or {}, provenance, prov_sha)
    tags["content_sha256"] = content
    tags["registered_by_reference"] = str(config.register_by_reference).lower()
    params, merge_metrics = report_params(report, provenance)
    metrics = {**merge_metrics, **score_metrics(scores or {}, summary or {})}
    readme = (path / "README.md").read_text(encoding="utf-8")
    name = run_name or f"merge-{(provenance.get('recipe') or {}).get('name') or report.method}-{tags['recipe_sha256'][:8]}"

    with use_store(config), tempfile.TemporaryDirectory(prefix="metamerge-register-") as tmp:
        tmp = Path(tmp)
        client = config.client()
        exp = client.get_experiment_by_name(config.experiment_name)
        if exp is None:
            experiment_id = client.create_experiment(config.experiment_name, artifact_location=config.artifact_location)
        else:
            experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        full_lineage = {"tags": tags, "caller": dict(lineage or {}), "inputs": provenance.get("inputs", []),
                        "outputs": outputs, "provenance_sha256": prov_sha}
        (tmp / "lineage.json").write_text(json.dumps(full_lineage, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "scores.json").write_text(json.dumps({"scores": scores or {}, "summary": summary or {}}, indent=2,
                                                    sort_keys=True, default=str) + "\n")
        if config.register_by_reference:
            files = {**outputs, "provenance.json": prov_sha}
            ref_dir = tmp / "reference"
            ref_dir.mkdir()
            (ref_dir / "reference.json").write_text(json.dumps(
                {"path": str(path), "files": files, "provenance_sha256": prov_sha}, indent=2, sort_keys=True) + "\n")
            artifacts = {REFERENCE_ARTIFACT: str(ref_dir / "reference.json")}
        else:
            artifacts = {MERGED_ARTIFACT: str(path)}

        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=nested, tags=tags) as run:
            mlflow.log_params(params)
            if metrics:
                mlflow.log_metrics(metrics)
            for f in SIDE_FILES:
                mlflow.log_artifact(str(path / f), MERGE_DIR)
            mlflow.log_artifact(str(tmp / "lineage.json"), MERGE_DIR)
            mlflow.log_artifact(str(tmp / "scores.json"), EVAL_DIR)
            _log_extra(mlflow, extra_artifacts)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*type hints.*")
                warnings.filterwarnings("ignore", message=".*input example.*")
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME_IN_RUN, python_model=str(PYFUNC_CODE), artifacts=artifacts,
                    pip_requirements=pip_requirements(provenance.get("output") == "lora_adapter"), signature=_signature(config))
            mv = mlflow.register_model(info.model_uri, config.model_name, tags=tags)
            run_id = run.info.run_id
            artifact_uri = run.info.artifact_uri
        # the card names the version that reproduces it: known only now
        card = _model_card(provenance, report, scores, readme,
                           REPRODUCE.format(name=config.model_name, version=mv.version, uri=config.tracking_uri))
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
        client.log_artifact(run_id, str(tmp / "model_card.md"), MERGE_DIR)
        client.update_model_version(config.model_name, mv.version, description=card[:MAX_DESCRIPTION])
        decision = (apply_gate(config.model_name, mv.version, config, client) if gate else
                    PromotionDecision(config.model_name, str(mv.version), "registered", "gate not run", None, None))
    return RegistrationResult(config.model_name, str(mv.version), f"models:/{config.model_name}/{mv.version}",
                              run_id, str(experiment_id), getattr(info, "model_id", None), artifact_uri,
                              config.register_by_reference, decision, tags)


def register_merged(model_dir: str | Path, *, summary: Mapping[str, Any] | None = None,
                    config: RegistryConfig | None = None, scores: Mapping[str, Mapping[str, Any]] | None = None,
                    lineage: Mapping[str, Any] | None = None, extra_artifacts: Iterable[str | Path] = (),
                    **kwargs: Any) -> dict:
    """The pipeline's entry point (``pipeline.registry_bridge.REGISTER_ENTRY_POINT``): :func:`register_merge`
    fed with the evaluation summary as ``evaluation.summarize`` writes it (``eval.json``).

    The merged model's per-task scores are taken from ``summary["scores"][summary["merged"]]``
    unless ``scores`` is given (a summary whose ``scores`` is already ``{task: {...}}`` works too).
    ``lineage`` defaults to ``{}`` plus ``prefect_flow_run_id`` from ``$PREFECT__FLOW_RUN_ID`` when
    set. Returns :meth:`RegistrationResult.to_dict` (JSON-able).
    """
    import os

    summary = dict(summary or {})
    if scores is None:
        table = summary.get("scores") or {}
        merged_name = summary.get("merged", "merged")
        if isinstance(table.get(merged_name), Mapping):
            scores = table[merged_name]
        elif table and all(isinstance(v, Mapping) and "loss" in v for v in table.values()):
            scores = table
        else:
            scores = {}
    lineage = dict(lineage or {})
    if "prefect_flow_run_id" not in lineage and os.environ.get("PREFECT__FLOW_RUN_ID"):
        lineage["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    rest = {k: v for k, v in summary.items() if k != "scores"}
    return register_merge(model_dir, scores, rest, lineage, config, extra_artifacts, **kwargs).to_dict()

