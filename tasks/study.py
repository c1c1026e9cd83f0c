"""The demo study's own tasks: build the scenario, the linearity check, the report."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from pipeline import study

from .common import ContentKey


@task(name="build_scenario")
def build_scenario(root: str, size: str, seed: int, scenario: str = "skills") -> dict:
    """The small base and its fine-tunes (or LoRA adapters); built once, then reused from disk."""
    return study.build_scenario(root, size, seed, progress=True, scenario=scenario)


@task(name="linearity_check", cache_policy=ContentKey(make_key=study.linearity_key), persist_result=True)
def linearity_check(base: str, finetuned: dict[str, str], eval_sets: dict[str, str],
                    revisions: dict[str, str]) -> dict[str, list[float]]:
    """Loss of theta_0 + alpha * tau_t on task t's own set, for each alpha.

    ``revisions`` (reference -> pinned content revision, as the merges pinned them) keys the cache.
    """
    return study.linearity(base, finetuned, eval_sets)


@task(name="study_report")
def study_report(workdir: str, scn: dict, results: dict, grid: dict, oracle: str,
                 linearity: dict, tracking_uri: str | None) -> dict:
    """The table (markdown, JSON), plots, an MLflow run holding them, and a Prefect artifact."""
    rep = study.write_report(workdir, scn, results, grid, oracle, linearity, tracking_uri)
    create_markdown_artifact(rep["table"], key="metamerge-study",
                             description="every merge method compared, as in the paper")
    return rep
