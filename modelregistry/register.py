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
    tags     git_commit, dvc_lock_sha256, prefect_flow_run_id, recipe_sha256, provenance_sha256,
             input.<i>.{role,ref,revision,source,files_sha256,files}, lineage.<other caller keys>
             (the same tags go on the registered version)
    artifacts merge/{merge_recipe.yaml, merge_report.json, provenance.json, README.md,
             model_card.md (with scores), lineage.json}, eval/scores.json, eval/<extra artifacts>
    model    the pyfunc model above, registered as a new version of ``config.model_name`` whose
             description is the model card; then ``promotion.apply_gate``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

from metamerge.errors import MergeError

from .config import RegistryConfig, use_store
from .promotion import PromotionDecision, apply_gate

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME_IN_RUN = "model"
MERGED_ARTIFACT = "merged"
REFERENCE_ARTIFACT = "reference"
SIDE_FILES = ("merge_recipe.yaml", "merge_report.json", "provenance.json", "README.md")
MERGE_DIR = "merge"
EVAL_DIR = "eval"
MAX_TAG = 7000
MAX_DESCRIPTION = 5000
PIP_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")


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

    @property
    def promoted(self) -> bool:
        return self.decision.promoted

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# lineage helpers
# ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _git_dir(start: Path) -> Path | None:
    for d in (start, *start.parents):
        g = d / ".git"
        if g.is_dir():
            return g
        if g.is_file():
            text = g.read_text(encoding="utf-8", errors="replace").strip()
            if text.startswith("gitdir:"):
                p = Path(text[len("gitdir:"):].strip())
                return p if p.is_absolute() else (d / p).resolve()
    return None


def git_commit(start: str | Path | None = None) -> str | None:
    """The commit checked out in the repository holding ``start`` (default: this project, then the
    working directory), read from ``.git`` files directly (no ``git`` binary needed); ``None`` if
    there is no repository or no commit yet."""
    starts = [Path(start)] if start else [Path(__file__).resolve().parent.parent, Path.cwd()]
    for s in starts:
        gitdir = _git_dir(s.absolute())
        if gitdir is None:
            continue
        try:
            head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40,64}", head) else None
        ref = head[len("ref:"):].strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text(encoding="utf-8").strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
        return None
    return None


def _files_digest(files: Mapping[str, str]) -> str:
    """Same construction as ``metamerge.refs.hash_model_dir``: the revision of a local directory."""
    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()


def lineage_tags(lineage: Mapping[str, Any], provenance: Mapping[str, Any], provenance_sha256: str) -> dict[str, str]:
    """Tags for the run and the registered version (see module docstring)."""
    lineage = dict(lineage or {})
    tags: dict[str, str] = {}
    commit = lineage.pop("git_commit", None) or git_commit()
    tags["git_commit"] = commit or "unknown"
    dvc_sha = lineage.pop("dvc_lock_sha256", None)
    dvc_lock = lineage.pop("dvc_lock", None)
    if not dvc_sha:
        lock = Path(dvc_lock) if dvc_lock else Path.cwd() / "dvc.lock"
        if lock.is_file():
            dvc_sha = sha256_file(lock)
        elif dvc_lock:
            raise MergeError(f"lineage dvc_lock: no such file {lock}")
    if dvc_sha:
        tags["dvc_lock_sha256"] = str(dvc_sha)
    flow_run = lineage.pop("prefect_flow_run_id", None)
    if flow_run:
        tags["prefect_flow_run_id"] = str(flow_run)
    tags["recipe_sha256"] = str(provenance.get("recipe_sha256", ""))
    tags["provenance_sha256"] = provenance_sha256
    tags["tokenizer_source"] = str(provenance.get("tokenizer_source", ""))
    for i, item in enumerate(provenance.get("inputs", [])):
        p = f"input.{i}."
        tags[p + "role"] = str(item.get("role", ""))
        tags[p + "ref"] = str(item.get("ref", ""))
        tags[p + "revision"] = str(item.get("revision", ""))
        tags[p + "source"] = str(item.get("source", ""))
        files = item.get("files") or {}
        if files:
            tags[p + "files_sha256"] = _files_digest(files)
            text = json.dumps(files, sort_keys=True, separators=(",", ":"))
            if len(text) <= MAX_TAG:  # the full list is always in provenance.json and lineage.json
                tags[p + "files"] = text
    for key, value in lineage.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        tags[f"lineage.{_key(str(key))}"] = text[:MAX_TAG]
    return tags


# ---------------------------------------------------------------------------------------------
# metrics and params
# ---------------------------------------------------------------------------------------------

_SUMMARY_ALIASES = {"average_normalized_exact_match": "mean_normalized_score",
                    "average_loss_difference": "ald"}


def _key(text: str) -> str:
    """A valid MLflow metric/param/tag key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", text)[:250] or "_"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def score_metrics(scores: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> dict[str, float]:
    """Flatten ``scores``/``summary`` into MLflow metrics (``None`` and non-numbers are skipped).

    Per-task normalized scores come from ``scores[task]["normalized_score"]``, else
    ``summary["normalized_scores"][task]`` or ``summary["normalized_exact_match"][task]``
    (``metamerge.evaluate.summarize``'s name); ``summary["loss_difference"][task]`` becomes
    ``<task>.loss_difference``. ``mean_normalized_score`` and ``ald`` also accept evaluate's
    ``average_normalized_exact_match`` and ``average_loss_difference``.
    """
    out: dict[str, float] = {}
    summary = dict(summary or {})
    per_task_norm = {**(summary.get("normalized_exact_match") or {}), **(summary.get("normalized_scores") or {})}
    loss_diff = summary.get("loss_difference") or {}
    for task, values in (scores or {}).items():
        t = _key(str(task))
        for k, v in (values or {}).items():
            if (x := _number(v)) is not None:
                out[f"{t}.{_key(str(k))}"] = x
        if f"{t}.normalized_score" not in out and (x := _number(per_task_norm.get(task))) is not None:
            out[f"{t}.normalized_score"] = x
        if (x := _number(loss_diff.get(task) if isinstance(loss_diff, Mapping) else None)) is not None:
            out.setdefault(f"{t}.loss_difference", x)
    for task, v in per_task_norm.items():  # tasks present only in the summary
        if (x := _number(v)) is not None:
            out.setdefault(f"{_key(str(task))}.normalized_score", x)
    for k, v in summary.items():
        if (x := _number(v)) is not None:
            out.setdefault(_key(_SUMMARY_ALIASES.get(k, k)), x)
    for bench, values in (summary.get("lm_eval") or {}).items():  # lm-evaluation-harness results
        for k, v in (values or {}).items():
            if (x := _number(v)) is not None:
                out[f"lm_eval.{_key(str(bench))}.{_key(str(k))}"] = x
    return out


def report_params(report: Mapping[str, Any], provenance: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    """Params (method, refs, revisions, ...) and metrics (lambdas, norms) of a merge report."""
    models = list(report.get("models") or [])
    params: dict[str, Any] = {
        "method": report.get("method"), "granularity": report.get("granularity"), "base": report.get("base"),
        "n_models": len(models), "recipe_sha256": provenance.get("recipe_sha256"),
        "dtype": report.get("dtype"), "out_dtype": report.get("out_dtype"),
        "tokenizer_source": provenance.get("tokenizer_source"), "device": provenance.get("device"),
    }
    for i, ref in enumerate(models):
        params[f"model.{i}"] = ref
    for k, v in (report.get("parameters") or {}).items():
        params[f"parameter.{_key(str(k))}"] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    for i, item in enumerate(provenance.get("inputs", [])):
        params[f"input.{i}.revision"] = item.get("revision")
    for k, v in (provenance.get("versions") or {}).items():
        params[f"version.{_key(str(k))}"] = v
    params = {k: str(v)[:6000] for k, v in params.items() if v is not None}
    metrics: dict[str, float] = {}
    model = report.get("model") or {}
    for prefix, key in (("lambda", "lambdas"), ("coefficient", "coefficients_mean"), ("task_vector_norm", "norms")):
        values = model.get(key) or {}
        for i, ref in enumerate(models):
            if (x := _number(values.get(ref))) is not None:
                metrics[f"{prefix}.{i}"] = x
    return params, metrics


def _model_card(provenance: Mapping[str, Any], report: Mapping[str, Any], scores, fallback: str) -> str:
    """The merge's model card re-rendered with the scores (falls back to the README as merged)."""
    try:
        from metamerge.modelcard import render_model_card
        from metamerge.report import MergeReport

        recipe_d = provenance.get("recipe") or {}
        recipe = SimpleNamespace(name=recipe_d.get("name"), merge_method=recipe_d.get("merge_method", report.get("method")))
        ins = [SimpleNamespace(ref=i.get("ref"), revision=i.get("revision")) for i in provenance.get("inputs", [])]
        base = next((SimpleNamespace(ref=i.ref, revision=i.revision) for i, d in
                     zip(ins, provenance.get("inputs", [])) if d.get("role") == "base"), None)
        models = [i for i, d in zip(ins, provenance.get("inputs", [])) if d.get("role") != "base"]
        table = {t: {k: v for k, v in (m or {}).items() if v is None or _number(v) is not None}
                 for t, m in (scores or {}).items()}
        return render_model_card(recipe, MergeReport.from_dict(dict(report)), SimpleNamespace(base=base, models=models), scores=table or None,
                                 reproduce="metamerge reproduce NAME VERSION OUT_DIR   # checks inputs and bit-identity")
    except Exception:  # the card is documentation: never fail a registration over it
        return fallback


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (given explicitly: inference would load the model)."""
    out = []
    for pkg in PIP_PACKAGES:
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


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def read_merged_dir(merged_dir: str | Path) -> tuple[Path, dict, dict]:
    """Check ``merged_dir`` is a metamerge output; return (path, report, provenance)."""
    path = Path(merged_dir).absolute()
    if not path.is_dir():
        raise MergeError(f"{path} is not a directory; pass the OUT_DIR of `metamerge merge`")
    missing = [f for f in SIDE_FILES if not (path / f).is_file()]
    if missing:
        raise MergeError(f"{path} lacks {', '.join(missing)}: not a complete `metamerge merge` output")
    try:
        report = json.loads((path / "merge_report.json").read_text(encoding="utf-8"))
        provenance = json.loads((path / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
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
                {task: float|None}, ...}`` (``metamerge.evaluate.summarize`` output is accepted too)
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
    tags = lineage_tags(lineage or {}, provenance, prov_sha)
    tags["registered_by_reference"] = str(config.register_by_reference).lower()
    params, merge_metrics = report_params(report, provenance)
    metrics = {**merge_metrics, **score_metrics(scores or {}, summary or {})}
    readme = (path / "README.md").read_text(encoding="utf-8")
    card = _model_card(provenance, report, scores, readme)
    name = run_name or f"merge-{(provenance.get('recipe') or {}).get('name') or report.get('method')}-{tags['recipe_sha256'][:8]}"

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
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
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
            mlflow.log_artifact(str(tmp / "model_card.md"), MERGE_DIR)
            mlflow.log_artifact(str(tmp / "lineage.json"), MERGE_DIR)
            mlflow.log_artifact(str(tmp / "scores.json"), EVAL_DIR)
            _log_extra(mlflow, extra_artifacts)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*type hints.*")
                warnings.filterwarnings("ignore", message=".*input example.*")
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME_IN_RUN, python_model=str(PYFUNC_CODE), artifacts=artifacts,
                    pip_requirements=pip_requirements(), signature=_signature(config))
            mv = mlflow.register_model(info.model_uri, config.model_name, tags=tags)
            run_id = run.info.run_id
            artifact_uri = run.info.artifact_uri
        client.update_model_version(config.model_name, mv.version, description=card[:MAX_DESCRIPTION])
        decision = (apply_gate(config.model_name, mv.version, config, client) if gate else
                    PromotionDecision(config.model_name, str(mv.version), "registered", "gate not run", None, None))
    return RegistrationResult(config.model_name, str(mv.version), f"models:/{config.model_name}/{mv.version}",
                              run_id, str(experiment_id), getattr(info, "model_id", None), artifact_uri,
                              config.register_by_reference, decision, tags)


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


def register_merged(model_dir: str | Path, *, summary: Mapping[str, Any] | None = None,
                    config: RegistryConfig | None = None, scores: Mapping[str, Mapping[str, Any]] | None = None,
                    lineage: Mapping[str, Any] | None = None, extra_artifacts: Iterable[str | Path] = (),
                    **kwargs: Any) -> dict:
    """The pipeline's entry point (``tasks.steps.REGISTER_ENTRY_POINT``): :func:`register_merge`
    fed with the evaluation summary as ``metamerge.evaluate.summarize`` writes it (``eval.json``).

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
