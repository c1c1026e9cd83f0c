"""Progress where Prefect and DVC users look: the task run's log (Prefect API) and a DVC stage's
output, as lines at each tenth of the work, and no third-party progress bar in either."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline_helpers import params_for

REPO = Path(__file__).resolve().parents[2]
BAR_MARKS = ("\r", "it/s", "%|", "█")


def _stage(stage: str, params: Path, workdir: Path) -> subprocess.CompletedProcess:
    # a cache of its own: the norms are computed here (and report progress), not read from the cache
    env = {**os.environ, "PYTHONPATH": str(REPO), "METAMERGE_CACHE_DIR": str(workdir / "cache")}
    return subprocess.run([sys.executable, "-m", "flows.stages", stage, str(params), "--dir", str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dvc_stages_print_progress_lines_and_no_bars(tiny_models, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_for(tiny_models, tmp_path)))
    outputs = {}
    for stage in ("download", "norms", "merge", "evaluate-inputs", "evaluate"):
        proc = _stage(stage, params, tmp_path / "dvc")
        assert proc.returncode == 0, proc.stderr
        outputs[stage] = proc.stderr + proc.stdout
    for stage, text in outputs.items():
        assert not any(mark in text for mark in BAR_MARKS), (stage, text)
    merge_lines = [line for line in outputs["merge"].splitlines() if line.startswith("merge: ")]
    assert merge_lines and merge_lines[-1].startswith("merge: 100% (")
    assert any("100% (" in line for line in outputs["norms"].splitlines())
    # evaluation reports its batches per model and set (the inputs, then the merge)
    assert sum("100% (" in line for line in outputs["evaluate-inputs"].splitlines()) >= 2
    assert sum("100% (" in line for line in outputs["evaluate"].splitlines()) >= 2


def test_prefect_task_runs_log_progress_and_no_bars(tiny_models, tmp_path, prefect_server, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.merge_flow import merge_flow

    monkeypatch.setenv("METAMERGE_CACHE_DIR", str(tmp_path / "cache"))  # the norm pass runs, not the cache
    logger = logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.setLevel(logging.INFO)  # the suite runs Prefect at WARNING; a worker logs INFO
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    try:  # every task runs (earlier tests of these models left their norms in Prefect's cache)
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
            state = merge_flow(params_for(tiny_models, tmp_path, eval_sets={}, experts={}), return_state=True)
        APILogWorker.drain_all(timeout=30)
    finally:
        logger.setLevel(level)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    messages = [log.message for log in logs]
    merge_lines = [m for m in messages if m.startswith("merge: ") and "%" in m]
    assert merge_lines and merge_lines[-1].startswith("merge: 100% ("), messages
    norm_lines = [m for m in messages if m.startswith("sqnorm: ") and "%" in m]  # compute_norms' pass
    assert norm_lines and norm_lines[-1].startswith("sqnorm: 100% ("), messages
    assert not any(mark in m for m in messages for mark in BAR_MARKS)
