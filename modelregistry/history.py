"""The gate's decision log: append-only, one entry per decision, kept on the registered model.

Why on the registered model and not on each version: the per-version ``promotion.*`` tags hold only
the latest decision about that version (a forced promotion replaced the rejection before it), and
the log must also say what the champion was at each moment. Each decision is one registered-model
tag ``gate.log.<time in ns, 20 digits>.<random>`` whose value is the entry as JSON, so two writers
never write the same key (nothing is ever overwritten) and the keys sort in decision order. The
whole log is also written as ``promotion/history.json`` into the decided version's run (an MLflow
artifact beside the model), so the UI shows the history a decision was taken against.

An entry (:class:`Decision`): ``seq`` (1-based position, filled when read), ``version``,
``previous_champion``, ``champion`` (after the decision), ``result`` (``promoted`` | ``rejected`` |
``rolled_back``), ``rule`` (``gate`` | ``forced`` | ``rollback``), ``reason``, ``metric``, ``value``
(the candidate's), ``baseline`` (what it was compared with) and ``baseline_source``, ``compared``
(every metric the rule read), ``user``, ``time`` (UTC, ISO 8601), ``flow_run_id``.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

LOG_TAG = "gate.log."
ARTIFACT_DIR = "promotion"
ARTIFACT_NAME = "history.json"


@dataclass
class Decision:
    """One line of the log (see the module docstring for the fields)."""

    version: str
    previous_champion: str | None
    champion: str | None
    result: str
    rule: str
    reason: str
    user: str
    time: str
    flow_run_id: str | None = None
    metric: str | None = None
    value: float | None = None
    baseline: float | None = None
    baseline_source: str | None = None
    compared: dict[str, float | None] = field(default_factory=dict)
    seq: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def current_user() -> str:
    """Who took the decision: the login of the process (``$USER`` in containers without a passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry and no LOGNAME/USER
        return os.environ.get("USER") or "unknown"


def now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _json_number(x: float | None) -> float | None | str:
    """NaN and inf are not JSON: written as strings so the log says what the gate saw."""
    if x is None or x == x and abs(x) != float("inf"):
        return x
    return str(x)


def append(client, name: str, decision: Decision) -> str:
    """Add ``decision`` to ``name``'s log (a new tag; never rewrites one); returns its key."""
    key = f"{LOG_TAG}{time.time_ns():020d}.{secrets.token_hex(4)}"
    entry = decision.to_dict()
    entry.pop("seq", None)
    entry["value"], entry["baseline"] = _json_number(entry["value"]), _json_number(entry["baseline"])
    entry["compared"] = {k: _json_number(v) for k, v in entry["compared"].items()}
    client.set_registered_model_tag(name, key, json.dumps(entry, sort_keys=True))
    return key


def read(client, name: str) -> list[Decision]:
    """``name``'s decisions, oldest first (an empty list for a model with no decision yet)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException:
        return []
    out = []
    for i, key in enumerate(sorted(k for k in tags if k.startswith(LOG_TAG)), start=1):
        entry = json.loads(tags[key])
        known = {k: v for k, v in entry.items() if k in Decision.__dataclass_fields__}
        out.append(Decision(**{**known, "seq": i}))
    return out


def log_artifact(client, name: str, version: str) -> None:
    """Write the whole log as ``promotion/history.json`` into ``version``'s run (best effort: the
    registry tags are the record; a run that is gone only loses this copy)."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = client.get_model_version(name, str(version)).run_id
    except MlflowException:
        return
    if not run_id:
        return
    with tempfile.TemporaryDirectory(prefix="metamerge-history-") as tmp:
        path = Path(tmp) / ARTIFACT_NAME
        path.write_text(json.dumps({"model": name, "decisions": [d.to_dict() for d in read(client, name)]},
                                   indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        try:
            client.log_artifact(run_id, str(path), ARTIFACT_DIR)
        except (MlflowException, OSError):
            pass


def format_history(name: str, decisions: list[Decision]) -> str:
    """One line per decision, for ``metamerge-registry history``."""
    if not decisions:
        return f"{name}: no gate decision yet"
    lines = [f"{name}: {len(decisions)} decision(s), oldest first"]
    for d in decisions:
        prev = f"v{d.previous_champion}" if d.previous_champion else "none"
        champ = f"v{d.champion}" if d.champion else "none"
        lines.append(f"{d.seq:4d}  {d.time}  v{d.version}  {d.result:<11s} {d.rule:<8s} champion {prev} -> "
                     f"{champ}  by {d.user}{'  run ' + d.flow_run_id if d.flow_run_id else ''}: {d.reason}")
    return "\n".join(lines)
