"""The table of registered methods (``metamerge methods``; the README's table is its output), made
from what each method declares, so the documentation cannot drift from the code."""

from __future__ import annotations

from .base import _REGISTRY
from .params import REQUIRED, Param

BASE = {"required": "required", "optional": "optional", "input": "merged as a model"}


def _param(p: Param) -> str:
    text = p.name + ("" if p.default is REQUIRED else f"={p.default!r}".replace("'", ""))
    return f"{text} (per model)" if p.per_model else text


def methods_table() -> str:
    """Markdown: one row per method with what it does, its base, its input and its parameters."""
    rows = ["| method | what it does | base_model | works on | parameters |", "|---|---|---|---|---|"]
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        works_on = "task vectors" if cls.task_vectors else "raw weights"
        params = ", ".join(_param(p) for p in cls.params) or "-"
        summary = cls.summary.replace("|", "\\|")
        rows.append(f"| `{name}` | {summary} | {BASE[cls.base_policy]} | {works_on} | {params} |")
    return "\n".join(rows)
