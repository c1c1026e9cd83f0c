"""The manifest of a built scenario (``scenario.json``): where everything lies, how good each model is."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Bumped whenever the recipe changes what a build produces, so an old cached
#: scenario is rebuilt instead of being silently reused.
FORMAT_VERSION = 1



@dataclass
class ScenarioManifest:
    """Where everything in a built scenario lies, and how good each model is.

    Paths are stored relative to the scenario directory in ``scenario.json`` (the
    build happens in a temporary directory that is renamed afterwards, and users
    may move it); ``load`` makes them absolute again.
    """

    root: Path
    size: str
    seed: int
    tasks: list[str]
    base: Path
    finetuned: dict[str, Path]
    eval_sets: dict[str, Path]
    train_sets: dict[str, Path]
    #: ``accuracy[model][task]``: greedy exact-match accuracy, model in {"base", "ft-<task>"}
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    build_seconds: float = 0.0  # this build's time, reported by the CLI; not written to scenario.json (a DVC output)
    num_parameters: int = 0
    #: everything that determines the build's output; a cached build is reused only if equal
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: the fine-tunes are PEFT LoRA adapter folders of ``base`` (the ``lora`` scenario)
    adapters: bool = False

    @property
    def models(self) -> dict[str, Path]:
        """Every model directory by name: ``base`` and ``ft-<task>``."""
        return {"base": self.base, **{f"ft-{task}": path for task, path in self.finetuned.items()}}

    def to_json(self) -> dict[str, Any]:
        def rel(path: Path) -> str:
            return Path(path).relative_to(self.root).as_posix()

        return {
            "format_version": self.format_version,
            "size": self.size,
            "seed": self.seed,
            "tasks": list(self.tasks),
            "base": rel(self.base),
            "finetuned": {t: rel(p) for t, p in self.finetuned.items()},
            "eval_sets": {t: rel(p) for t, p in self.eval_sets.items()},
            "train_sets": {t: rel(p) for t, p in self.train_sets.items()},
            "accuracy": self.accuracy,
            "num_parameters": self.num_parameters,
            "params": self.params,
            **({"adapters": True} if self.adapters else {}),
        }

    @classmethod
    def from_json(cls, root: str | os.PathLike, data: dict[str, Any]) -> ScenarioManifest:
        root = Path(root).resolve()
        return cls(
            root=root,
            size=data["size"],
            seed=data["seed"],
            tasks=list(data["tasks"]),
            base=root / data["base"],
            finetuned={t: root / p for t, p in data["finetuned"].items()},
            eval_sets={t: root / p for t, p in data["eval_sets"].items()},
            train_sets={t: root / p for t, p in data["train_sets"].items()},
            accuracy=data.get("accuracy", {}),
            build_seconds=data.get("build_seconds", 0.0),
            num_parameters=data.get("num_parameters", 0),
            params=data.get("params", {}),
            format_version=data.get("format_version", 0),
            adapters=bool(data.get("adapters", False)),
        )

    @classmethod
    def load(cls, root: str | os.PathLike) -> ScenarioManifest:
        """Read ``root/scenario.json``."""
        root = Path(root)
        return cls.from_json(root, json.loads((root / "scenario.json").read_text()))

