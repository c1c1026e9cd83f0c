"""The MLflow layer of metamerge: register merged models, gate promotions, audit and reproduce.

Pure functions over MLflow (no Prefect), and their own command (``metamerge-registry``,
``cli.py``). Public API, imported lazily so that ``import modelregistry`` stays cheap::

    RegistryConfig                                  (config.py)
    register_merge, register_merged (pipeline entry point), RegistrationResult (register.py)
    git_commit, lineage_tags                        (lineage.py)
    score_metrics, report_params                    (metrics.py)
    model_files_dir, check_files                    (artifacts.py)
    apply_gate, promote, rollback, PromotionDecision (promotion.py)
    audit, reproduce, format_audit                  (audit.py)
    log_run                                         (runs.py: plain runs, e.g. the demo study)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RegistryConfig": "config", "register_merge": "register", "RegistrationResult": "register",
    "register_merged": "register", "git_commit": "lineage", "lineage_tags": "lineage",
    "score_metrics": "metrics", "report_params": "metrics", "model_files_dir": "artifacts",
    "check_files": "artifacts", "apply_gate": "promotion", "promote": "promotion", "rollback": "promotion",
    "PromotionDecision": "promotion", "audit": "audit", "reproduce": "audit", "format_audit": "audit",
    "log_run": "runs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'modelregistry' has no attribute {name!r}")
