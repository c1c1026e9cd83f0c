"""The demo scenario: four exactly-scored toy skills, a small base model and one fine-tune per skill.

A client of the merge core, not part of it: it makes the models the demo merges.

``skills`` is pure Python; ``build`` needs torch and transformers, so its names are
imported only when first used -- listing the skills should not cost a torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scenarios.skills import SKILL_NAMES, Skill, all_skills, exact_match, get_skill

if TYPE_CHECKING:
    from scenarios.build import ScenarioManifest, build_scenario, greedy_accuracy

__all__ = [
    "SKILL_NAMES",
    "ScenarioManifest",
    "Skill",
    "all_skills",
    "build_scenario",
    "exact_match",
    "get_skill",
    "greedy_accuracy",
]

_FROM_BUILD = {"ScenarioManifest", "build_scenario", "greedy_accuracy"}


def __getattr__(name: str) -> Any:
    if name in _FROM_BUILD:
        from scenarios import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
