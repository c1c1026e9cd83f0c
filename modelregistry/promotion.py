"""Promotion with registry aliases (stages are deprecated in MLflow 3), every decision logged.

Aliases
    ``challenger``  the most recently registered version (every new version gets it);
    ``champion``    the version in service. It moves only through :func:`apply_gate` (automatic),
                    :func:`promote` (forced, with a reason) or :func:`rollback`.

The gate (:func:`apply_gate`), with ``RegistryConfig.metric`` (default ``mean_normalized_score``,
higher is better), ``tolerance`` (default 0) and ``floor`` (default 0), reading the metrics logged
on the version's run. In order, the first rule that applies decides:

1. the metric missing or not finite (NaN, inf) rejects; so does any ``<task>.normalized_score``
   that is not finite;
2. any task whose normalized score is below ``floor`` rejects;
3. the baseline is the best of (a) the best score any promoted version ever had, counting every
   promotion in the log except versions later rolled back, and (b) the base model's score from
   the same evaluation (metric ``baseline.<metric>``; so a first version must beat the unmerged base).
   With neither, the version is rejected ("no baseline": evaluate the base, or promote by hand);
4. the version is promoted only if strictly better than ``baseline - tolerance`` (``baseline +
   tolerance`` when ``greater_is_better`` is false, e.g. for ``ald``): a tie does not promote, and
   since the bar is the best ever promoted score, quality cannot ratchet down by tolerance steps.

Every decision (gate, forced promotion, rollback) is appended to the registered model's log
(``history.py``; ``metamerge-registry history NAME``; ``promotion/history.json`` in the version's
run) with the version, previous champion, metrics compared, rule, result, reason, user, time and
Prefect flow run. The latest decision about a version is also on the version as tags
(``promotion.decision``, ``.reason``, ``.previous_champion``, ``.by``, ``.user``, ``.timestamp``,
``.metric``, ``.value``, ``.baseline``); :func:`rollback` follows ``promotion.previous_champion``,
so repeated rollbacks walk back the chain of champions.

Decisions are serialised per registered model: with a local SQLite store, an exclusive ``flock`` on
``.<db>.gate-<model>.lock`` beside the database (every process on the machine takes turns); with any
store, a compare-and-set on the champion alias (re-read just before it is set; if it moved since the
decision was computed, the decision is computed again); the pipeline's ``register`` task also holds
a Prefect global concurrency limit named after the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from metamerge.errors import MergeError

from . import history
from .config import RegistryConfig, sqlite_path

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG = "promotion."
NORMALIZED_SUFFIX = ".normalized_score"
BASELINE_PREFIX = "baseline."
CAS_ATTEMPTS = 5


@dataclass
class PromotionDecision:
    """What happened to one version: ``decision`` is promoted, rejected or rolled_back."""

    name: str
    version: str
    decision: str
    reason: str
    previous_champion: str | None
    champion: str | None  # the champion after the decision
    by: str = "gate"
    metric: str | None = None
    value: float | None = None
    champion_value: float | None = None  # the baseline the value was compared with
    below_floor: dict[str, float] = field(default_factory=dict)
    user: str | None = None
    baseline_source: str | None = None

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"


def _version(client, name: str, version) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise MergeError(f"registered model '{name}' has no version {version}") from None


def champion_version(client, name: str):
    """The ``ModelVersion`` behind ``name@champion``, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _champion_number(client, name: str) -> str | None:
    champ = champion_version(client, name)
    return str(champ.version) if champ is not None else None


def _run_metrics(client, run_id: str | None) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:
        return {}


def _record(client, name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, TAG + key, "" if value is None else str(value))


@contextlib.contextmanager
def gate_lock(config: RegistryConfig, name: str) -> Iterator[None]:
    """One gate decision at a time per registered model on this machine (a local SQLite store):
    an exclusive ``flock`` on ``.<db>.gate-<model>.lock``, released by the kernel if the process
    dies. Other stores rely on the compare-and-set and the Prefect concurrency limit."""
    db = sqlite_path(config.tracking_uri)
    if db is None:
        yield
        return
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent / f".{db.name}.gate-{safe}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def best_promoted(decisions: list[history.Decision], metric: str, greater_is_better: bool
                  ) -> tuple[float | None, str | None]:
    """The best ``metric`` value any promoted version had, and that version (rolled-back versions
    do not count: a rollback withdraws the promotion)."""
    alive: dict[str, float] = {}
    for d in decisions:  # in order: a later rollback withdraws, a later promotion restores
        if d.result == "rolled_back":
            alive.pop(d.version, None)
        elif (d.result == "promoted" and d.metric == metric and isinstance(d.value, (int, float))
              and math.isfinite(d.value)):
            alive[d.version] = float(d.value)
    best: tuple[float | None, str | None] = (None, None)
    for version, value in alive.items():
        if best[0] is None or (value > best[0] if greater_is_better else value < best[0]):
            best = (value, version)
    return best


def _flow_run_id(mv, flow_run_id: str | None) -> str | None:
    """The flow run deciding: given, else the one that registered the version, else this process's."""
    return flow_run_id or (mv.tags or {}).get("prefect_flow_run_id") or os.environ.get("PREFECT__FLOW_RUN_ID")


def _evaluate(config: RegistryConfig, version: str, metrics: dict[str, float], prev: str | None,
              decisions: list[history.Decision]) -> tuple[bool, str, dict]:
    """The gate's rules (module docstring) for one version: (passed, reason, details)."""
    metric, tol = config.metric, config.tolerance
    value = metrics.get(metric)
    norms = {k[: -len(NORMALIZED_SUFFIX)]: v for k, v in sorted(metrics.items())
             if k.endswith(NORMALIZED_SUFFIX) and not k.startswith(BASELINE_PREFIX)}
    compared: dict[str, float | None] = {metric: value, **{f"{t}{NORMALIZED_SUFFIX}": v for t, v in norms.items()}}
    base_value = metrics.get(BASELINE_PREFIX + metric)
    best, best_version = best_promoted(decisions, metric, config.greater_is_better)
    if base_value is not None:
        compared[BASELINE_PREFIX + metric] = base_value
    if best is not None:
        compared[f"best_promoted.{metric}"] = best
    details: dict = {"metric": metric, "value": value, "compared": compared, "below": {},
                     "baseline": None, "baseline_source": None}

    if prev == version:
        return True, f"v{version} is already the champion", details
    if not _finite(value):
        what = "no" if value is None else f"a non-finite ({value})"
        return False, f"v{version} has {what} {metric}: nothing to compare", details
    bad = [t for t, v in norms.items() if not math.isfinite(v)]
    if bad:
        return False, "non-finite normalized score for task(s): " + ", ".join(bad), details
    below = {t: v for t, v in norms.items() if v < config.floor}
    details["below"] = below
    if below:
        return False, (f"task(s) below the floor {config.floor:g}: "
                       + ", ".join(f"{t}={v:.4g}" for t, v in below.items())), details

    candidates = []
    if best is not None:
        candidates.append((best, f"best promoted v{best_version}"))
    if _finite(base_value):
        candidates.append((float(base_value), "the base model"))  # type: ignore[arg-type]
    if not candidates:
        return False, (f"no baseline: no promoted version and no base model {metric} "
                       f"({BASELINE_PREFIX}{metric}); evaluate the base, or promote by hand with a reason"), details
    pick = max if config.greater_is_better else min
    baseline, source = pick(candidates, key=lambda c: c[0])
    details["baseline"], details["baseline_source"] = baseline, source
    assert value is not None
    if config.greater_is_better:
        bar = baseline - tol
        passed = value > bar
        op, bound = (">" if passed else "<="), f"{_fmt(baseline)} - {tol:g}"
    else:
        bar = baseline + tol
        passed = value < bar
        op, bound = ("<" if passed else ">="), f"{_fmt(baseline)} + {tol:g}"
    return passed, f"{metric} {_fmt(value)} {op} {source}'s {bound} (tolerance)", details


def apply_gate(name: str, version, config: RegistryConfig | None = None, client=None, *,
               flow_run_id: str | None = None, user: str | None = None) -> PromotionDecision:
    """Give ``version`` the ``challenger`` alias and move ``champion`` to it if the gate passes;
    the decision is appended to the model's log either way."""
    config = config or RegistryConfig()
    client = client or config.client()
    version = str(version)
    user = user or history.current_user()
    with gate_lock(config, name):
        mv = _version(client, name, version)
        client.set_registered_model_alias(name, CHALLENGER, version)
        metrics = _run_metrics(client, mv.run_id)
        for _ in range(CAS_ATTEMPTS):
            prev = _champion_number(client, name)
            decisions = history.read(client, name)
            passed, reason, d = _evaluate(config, version, metrics, prev, decisions)
            if not passed or prev == version:
                break
            # compare-and-set: the champion must still be the one the decision was computed against
            if _champion_number(client, name) != prev:
                continue
            client.set_registered_model_alias(name, CHAMPION, version)
            break
        else:
            raise MergeError(f"'{name}': the champion alias kept moving while v{version} was decided "
                             f"({CAS_ATTEMPTS} attempts); run the gate again")
        result = "promoted" if passed else "rejected"
        champion = version if passed else prev
        entry = history.Decision(version=version, previous_champion=prev, champion=champion, result=result,
                                 rule="gate", reason=reason, user=user, time=history.now(),
                                 flow_run_id=_flow_run_id(mv, flow_run_id), metric=d["metric"], value=d["value"],
                                 baseline=d["baseline"], baseline_source=d["baseline_source"],
                                 compared=d["compared"])
        if prev != version:
            history.append(client, name, entry)
        _record(client, name, version, {
            "decision": result, "reason": reason, "previous_champion": prev if prev != version else
            (mv.tags or {}).get(TAG + "previous_champion", ""), "by": "gate", "user": user,
            "timestamp": entry.time, "metric": config.metric, "value": _fmt(d["value"]),
            "baseline": _fmt(d["baseline"])})
        history.log_artifact(client, name, version)
    return PromotionDecision(name, version, result, reason, prev, champion, "gate", config.metric, d["value"],
                             d["baseline"], d["below"], user, d["baseline_source"])


def promote(name: str, version, reason: str = "", config: RegistryConfig | None = None,
            client=None, *, user: str | None = None, flow_run_id: str | None = None) -> PromotionDecision:
    """Make ``version`` the champion regardless of the gate: a forced promotion, which needs a
    reason and is logged as forced, with the user."""
    config = config or RegistryConfig()
    client = client or config.client()
    version = str(version)
    if not reason.strip():
        raise MergeError(f"promoting '{name}' v{version} by hand bypasses the gate: give a reason (--reason TEXT)")
    user = user or history.current_user()
    with gate_lock(config, name):
        mv = _version(client, name, version)
        prev = _champion_number(client, name)
        if prev == version:
            return PromotionDecision(name, version, "promoted", f"v{version} is already the champion",
                                     prev, version, "manual", user=user)
        text = f"manual: {reason}"
        client.set_registered_model_alias(name, CHAMPION, version)
        value = _run_metrics(client, mv.run_id).get(config.metric)
        entry = history.Decision(version=version, previous_champion=prev, champion=version, result="promoted",
                                 rule="forced", reason=text, user=user, time=history.now(),
                                 flow_run_id=flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID"), metric=config.metric, value=value,
                                 compared={config.metric: value})
        history.append(client, name, entry)
        _record(client, name, version, {"decision": "promoted", "reason": text, "previous_champion": prev,
                                        "by": "manual", "user": user, "timestamp": entry.time})
        history.log_artifact(client, name, version)
    return PromotionDecision(name, version, "promoted", text, prev, version, "manual", config.metric, value,
                             user=user)


def rollback(name: str, config: RegistryConfig | None = None, reason: str = "",
             client=None, *, user: str | None = None) -> PromotionDecision:
    """Move ``champion`` back to the version it replaced (its ``promotion.previous_champion``)."""
    config = config or RegistryConfig()
    client = client or config.client()
    user = user or history.current_user()
    with gate_lock(config, name):
        champ = champion_version(client, name)
        if champ is None:
            raise MergeError(f"registered model '{name}' has no champion to roll back")
        target = champ.tags.get(TAG + "previous_champion", "")
        if not target:
            raise MergeError(f"'{name}': champion v{champ.version} records no previous champion; "
                             "use `metamerge-registry promote NAME VERSION --reason TEXT` to choose one")
        _version(client, name, target)
        why = f": {reason}" if reason else ""
        client.set_registered_model_alias(name, CHAMPION, target)
        now = history.now()
        old = str(champ.version)
        history.append(client, name, history.Decision(
            version=old, previous_champion=old, champion=target, result="rolled_back", rule="rollback",
            reason=f"rolled back to v{target}{why}", user=user, time=now, metric=config.metric,
            flow_run_id=os.environ.get("PREFECT__FLOW_RUN_ID")))
        _record(client, name, old, {"decision": "rolled_back", "by": "rollback", "user": user, "timestamp": now,
                                    "reason": f"rolled back to v{target}{why}"})
        _record(client, name, target, {"decision": "promoted", "by": "rollback", "user": user, "timestamp": now,
                                       "reason": f"rollback from v{old}{why}"})
        history.log_artifact(client, name, old)
    return PromotionDecision(name, target, "promoted", f"rollback from v{old}{why}", old, target, "rollback",
                             user=user)
