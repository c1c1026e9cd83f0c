"""A pipeline params file (``params/*.yaml``, ``params.yaml``), validated before any work starts.

::

    recipe:            # the engine's recipe, mergekit's YAML format (see metamerge.recipe)
      merge_method: metagpt
      base_model: ...
      models: [...]
    pipeline:          # everything the orchestration adds; all optional
      output_root: outputs
      device: auto
      eval_sets: {task: path/to/task.jsonl}
      experts: {task: model reference}     # the fine-tune that is task's expert (for the objective)
      registry: {model_name: ..., ...}    # modelregistry.config.RegistryConfig
      watch: [ref, {dir: folder, parameters: {}}]
      materialize_task_vectors: false
      output: model                        # or adapter: one PEFT LoRA adapter (adapters only)
      executor: {kind: local, n_workers: null}  # or {kind: dask, address: tcp://host:8786}

Relative paths (model references, output_root, eval sets) are relative to the working directory,
as for ``metamerge merge``. Every problem is one ``InputError`` line. When to run is not a param:
the schedules are ``prefect.yaml``'s.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metamerge.errors import InputError
from metamerge.recipe import Recipe, parse_recipe
from metamerge.validation import first_error, read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LmEvalParams(_Strict):
    """Standard benchmarks by EleutherAI's lm-evaluation-harness (optional: the user installs it)."""

    tasks: list[str] = Field(min_length=1)
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)    # examples per task (a fraction if < 1), for quick runs
    batch_size: int = Field(8, ge=1)


class EvalParams(_Strict):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    exact_match: bool = True
    lm_eval: LmEvalParams | None = None        # the merged model on these benchmarks too


class WatchDir(_Strict):
    """A folder whose sub-folders are fine-tunes: one that appears joins the merge."""

    dir: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class WatchRef(_Strict):
    """One model reference (hub repo or folder) watched for new revisions; joins the merge if new."""

    ref: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class ScenarioParams(_Strict):
    """The demo's scenario (``scenarios``), built into ``data_dir`` by DVC's first stage."""

    size: Literal["demo", "tiny"] = "demo"
    seed: int = 0


class ExecutorParams(_Strict):
    """Where the merge's units run (``metamerge.executors.ExecutorConfig``): ``local`` worker
    processes of the merge task, or ``dask``: each unit a Prefect task on ``prefect-dask``'s
    ``DaskTaskRunner`` (the cluster at ``address``, else a ``LocalCluster`` of ``n_workers``)."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = None
    n_workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    unit_size: str = "256MB"


class PipelineParams(_Strict):
    name: str | None = None
    output_root: str = "outputs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_sets: dict[str, str] = Field(default_factory=dict)
    experts: dict[str, str] = Field(default_factory=dict)
    eval: EvalParams = Field(default_factory=EvalParams)
    registry: dict[str, Any] | None = None  # a modelregistry.config.RegistryConfig mapping
    watch: list[str | WatchRef | WatchDir] = Field(default_factory=list)
    materialize_task_vectors: bool = False
    max_shard_size: str = "5GB"
    # what the merge writes: a full model, or (adapters only; linear, task_arithmetic, metagpt) one
    # PEFT LoRA adapter equal to the merge, ``metamerge merge --as-adapter [--rank adapter_rank]``
    output: Literal["model", "adapter"] = "model"
    adapter_rank: int | None = Field(default=None, ge=1)
    executor: ExecutorParams = Field(default_factory=ExecutorParams)
    data_dir: str | None = None            # DVC: the folder of local models and eval sets it tracks
    scenario: ScenarioParams | None = None  # DVC: build the demo scenario into data_dir first

    def watch_entries(self) -> list[WatchRef | WatchDir]:
        return [WatchRef(ref=w) if isinstance(w, str) else w for w in self.watch]


class _File(_Strict):
    recipe: dict[str, Any]
    pipeline: PipelineParams = Field(default_factory=PipelineParams)


class Params(BaseModel):
    """A validated params file: the engine's ``Recipe`` plus the pipeline settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    recipe: Recipe
    pipeline: PipelineParams
    source: str = "params"

    @property
    def name(self) -> str:
        return self.pipeline.name or self.recipe.name or self.recipe.merge_method

    @property
    def output_root(self) -> Path:
        return Path(self.pipeline.output_root).expanduser().absolute()

    def recipe_text(self) -> str:
        """The recipe as YAML, as it goes into the merged model's ``merge_recipe.yaml``."""
        return yaml.safe_dump(self.recipe.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that ``load_params`` accepts again (flow parameters, subflows)."""
        return {"recipe": self.recipe.model_dump(exclude_none=True, exclude_defaults=True),
                "pipeline": self.pipeline.model_dump(exclude_defaults=True)}

    def with_models(self, extra: list[dict[str, Any]]) -> Params:
        """The same params with more fine-tunes appended to the recipe (the watcher's update)."""
        data = self.to_dict()
        data["recipe"]["models"] = list(data["recipe"]["models"]) + extra
        return load_params(data, self.source)


def _first_error(exc: ValidationError, source: str) -> InputError:
    # the watch list is a union (a string or a mapping): pydantic reports every alternative
    return first_error(exc, source, "params", prefer_unknown_key=True, hidden_loc=("str", "WatchRef", "WatchDir"))


def load_params(params: str | os.PathLike | Mapping[str, Any] | Params, source: str | None = None, *,
                check_files: bool = True) -> Params:
    """Read (if a path) and validate a params file; every problem is a one-line ``InputError``.

    ``check_files=False`` checks the schema only (eval-set files need not exist yet).
    """
    if isinstance(params, Params):
        return params
    if isinstance(params, (str, os.PathLike)):
        source = source or str(Path(params))
        data = read_yaml(params, "params file")
    else:
        data, source = params, source or "params"
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: a params file is a mapping with `recipe:` and `pipeline:`")
    try:
        raw = _File.model_validate(dict(data))
    except ValidationError as exc:
        raise _first_error(exc, source) from None
    recipe = parse_recipe(raw.recipe, f"{source}: recipe")
    _check(recipe, raw.pipeline, source, check_files)
    return Params(recipe=recipe, pipeline=raw.pipeline, source=source)


def registry_config(pipeline: PipelineParams, source: str = "params"):
    """``pipeline.registry`` validated by the registry's own model (``RegistryConfig``), or None."""
    if pipeline.registry is None:
        return None
    from modelregistry.config import RegistryConfig

    try:
        return RegistryConfig.model_validate(pipeline.registry)
    except ValidationError as exc:
        err = _first_error(exc, source)
        raise InputError(str(err).replace(f"{source}: ", f"{source}: pipeline.registry: ", 1)) from None


def _check(recipe: Recipe, pipeline: PipelineParams, source: str, check_files: bool) -> None:
    """Cross-field checks that pydantic alone cannot express."""
    if recipe.slices:
        raise InputError(f"{source}: recipe: slices (layer stacking) are not supported by the pipeline, whose steps "
                         "work per fine-tune on whole models; merge that recipe with `metamerge merge`")
    registry_config(pipeline, source)
    if pipeline.adapter_rank is not None and pipeline.output != "adapter":
        raise InputError(f"{source}: pipeline.adapter_rank applies to `output: adapter` only (the rank of the adapter "
                         "written); remove it or set pipeline.output: adapter")
    if pipeline.output == "adapter":
        from metamerge.adapter_out import METHODS

        if recipe.merge_method not in METHODS:
            raise InputError(f"{source}: pipeline.output: adapter: {recipe.merge_method} is not a weighted sum of the "
                             f"task vectors, so its result is not a LoRA; use {', '.join(METHODS)}, or output: model")
    if check_files and pipeline.eval.lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
        raise InputError(f"{source}: pipeline.eval.lm_eval names benchmarks but lm-evaluation-harness is not "
                         "installed: .venv/bin/pip install lm-eval, or remove pipeline.eval.lm_eval")
    for task, path in pipeline.eval_sets.items():
        if check_files and not Path(path).expanduser().is_file():
            raise InputError(f"{source}: eval set '{task}': no such file {Path(path).absolute()}")
    refs = {m.model for m in recipe.models}
    for task, ref in pipeline.experts.items():
        if task not in pipeline.eval_sets:
            raise InputError(f"{source}: experts: task '{task}' has no eval set under pipeline.eval_sets")
        if ref not in refs:
            raise InputError(f"{source}: experts: '{ref}' (expert of '{task}') is not a model of the recipe")
    if pipeline.experts and set(pipeline.experts) != set(pipeline.eval_sets):
        missing = sorted(set(pipeline.eval_sets) - set(pipeline.experts))
        raise InputError(f"{source}: experts: no expert for task(s) {', '.join(missing)}; "
                         "name one per eval set, or none")
