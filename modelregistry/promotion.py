"""Promotion with registry aliases (stages are deprecated in MLflow 3) and decisions recorded as tags.

Aliases
    ``challenger``  the most recently registered version (every new version gets it);
    ``champion``    the version in service. It moves only through :func:`apply_gate` (automatic),
                    :func:`promote` (manual override) or :func:`rollback`.

The gate (:func:`apply_gate`), with ``RegistryConfig.metric`` (default ``mean_normalized_score``),
``tolerance`` and ``floor``, reading the metrics logged on each version's run:

1. any task whose ``<task>.normalized_score`` is below ``floor`` rejects the version;
2. with no champion yet, the version becomes champion;
3. else it must score ``metric >= champion's metric - tolerance`` (``<= ... + tolerance`` when
   ``greater_is_better`` is false); a challenger without the metric is rejected, a champion
   without it is replaced.

Tags written on a version at each decision
    ``promotion.decision``           ``promoted`` | ``rejected`` | ``rolled_back``
    ``promotion.reason``             one line
    ``promotion.previous_champion``  the champion when the decision was taken ('' if none); for a
                                     promoted version this is what :func:`rollback` returns to
    ``promotion.by``                 ``gate`` | ``manual`` | ``rollback``
    ``promotion.timestamp``          UTC, ISO 8601
    ``promotion.metric``, ``promotion.value``, ``promotion.champion_value``  (gate only)

Rollback moves ``champion`` back to the current champion's ``promotion.previous_champion``; it does
not rewrite that tag on the restored version, so repeated rollbacks walk back the chain of
champions. Concurrent promotions of one registered model are not serialised: run one pipeline
per model at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from metamerge.errors import MergeError

from .config import RegistryConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG = "promotion."
NORMALIZED_SUFFIX = ".normalized_score"


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
    champion_value: float | None = None
    below_floor: dict[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    def to_dict(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"


def _version(client, name: str, version) -> object:
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


def apply_gate(name: str, version, config: RegistryConfig | None = None, client=None) -> PromotionDecision:
    """Give ``version`` the ``challenger`` alias and move ``champion`` to it if the gate passes."""
    config = config or RegistryConfig()
    client = client or config.client()
    version = str(version)
    mv = _version(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version)

    metrics = _run_metrics(client, mv.run_id)
    value = metrics.get(config.metric)
    below = {k[: -len(NORMALIZED_SUFFIX)]: v for k, v in sorted(metrics.items())
             if k.endswith(NORMALIZED_SUFFIX) and not math.isnan(v) and v < config.floor}
    champ = champion_version(client, name)
    prev = str(champ.version) if champ is not None else None
    champ_value = _run_metrics(client, champ.run_id).get(config.metric) if champ is not None else None

    if prev == version:
        passed, reason = True, f"v{version} is already the champion"
    elif below:
        passed = False
        reason = (f"task(s) below the floor {config.floor:g}: "
                  + ", ".join(f"{t}={v:.4g}" for t, v in below.items()))
    elif champ is None:
        passed, reason = True, f"no champion yet and no task below the floor {config.floor:g}"
    elif value is None or math.isnan(value):
        passed, reason = False, f"v{version} has no {config.metric} to compare with champion v{prev}"
    elif champ_value is None or math.isnan(champ_value):
        passed, reason = True, f"champion v{prev} has no {config.metric}; v{version} has {_fmt(value)}"
    else:
        tol = config.tolerance
        if config.greater_is_better:
            passed = value >= champ_value - tol
            op, bound = (">=" if passed else "<"), f"{_fmt(champ_value)} - {tol:g}"
        else:
            passed = value <= champ_value + tol
            op, bound = ("<=" if passed else ">"), f"{_fmt(champ_value)} + {tol:g}"
        reason = f"{config.metric} {_fmt(value)} {op} champion v{prev}'s {bound} (tolerance)"

    decision = "promoted" if passed else "rejected"
    if passed and prev != version:
        client.set_registered_model_alias(name, CHAMPION, version)
    _record(client, name, version, {
        "decision": decision, "reason": reason, "previous_champion": prev if prev != version else
        mv.tags.get(TAG + "previous_champion", ""), "by": "gate", "timestamp": _now(),
        "metric": config.metric, "value": _fmt(value), "champion_value": _fmt(champ_value)})
    return PromotionDecision(name, version, decision, reason, prev, version if passed else prev, "gate",
                             config.metric, value, champ_value, below)


def promote(name: str, version, reason: str = "", config: RegistryConfig | None = None,
            client=None) -> PromotionDecision:
    """Make ``version`` the champion regardless of the gate (a recorded manual override)."""
    config = config or RegistryConfig()
    client = client or config.client()
    version = str(version)
    _version(client, name, version)
    champ = champion_version(client, name)
    prev = str(champ.version) if champ is not None else None
    if prev == version:
        return PromotionDecision(name, version, "promoted", f"v{version} is already the champion",
                                 prev, version, "manual")
    text = f"manual: {reason}" if reason else "manual promotion"
    client.set_registered_model_alias(name, CHAMPION, version)
    _record(client, name, version, {"decision": "promoted", "reason": text, "previous_champion": prev,
                                    "by": "manual", "timestamp": _now()})
    return PromotionDecision(name, version, "promoted", text, prev, version, "manual")


def rollback(name: str, config: RegistryConfig | None = None, reason: str = "",
             client=None) -> PromotionDecision:
    """Move ``champion`` back to the version it replaced (its ``promotion.previous_champion``)."""
    config = config or RegistryConfig()
    client = client or config.client()
    champ = champion_version(client, name)
    if champ is None:
        raise MergeError(f"registered model '{name}' has no champion to roll back")
    target = champ.tags.get(TAG + "previous_champion", "")
    if not target:
        raise MergeError(f"'{name}': champion v{champ.version} records no previous champion; "
                         "use `metamerge-registry promote NAME VERSION` to choose one")
    _version(client, name, target)
    why = f": {reason}" if reason else ""
    client.set_registered_model_alias(name, CHAMPION, target)
    now = _now()
    _record(client, name, str(champ.version), {"decision": "rolled_back", "by": "rollback", "timestamp": now,
                                          "reason": f"rolled back to v{target}{why}"})
    _record(client, name, target, {"decision": "promoted", "by": "rollback", "timestamp": now,
                                   "reason": f"rollback from v{champ.version}{why}"})
    return PromotionDecision(name, target, "promoted", f"rollback from v{champ.version}{why}",
                             str(champ.version), target, "rollback")
