"""The MLflow layer of metamerge: register merged models, gate promotions, audit and reproduce.

Pure functions over MLflow (no Prefect). Public API, imported lazily so that ``import
modelregistry`` stays cheap::

    RegistryConfig                                  (config.py)
    register_merge, register_merged (pipeline entry point), RegistrationResult, git_commit (register.py)
    apply_gate, promote, rollback, PromotionDecision (promotion.py)
    audit, reproduce, format_audit                  (audit.py)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RegistryConfig": "config", "register_merge": "register", "RegistrationResult": "register",
    "register_merged": "register",
    "git_commit": "register", "model_files_dir": "register", "apply_gate": "promotion",
    "promote": "promotion", "rollback": "promotion", "PromotionDecision": "promotion",
    "audit": "audit", "reproduce": "audit", "format_audit": "audit",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'modelregistry' has no attribute {name!r}")
