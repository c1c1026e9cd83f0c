"""The layout's one rule, checked: layers import only the layers below them, and the merge core
names none of them (nor Prefect, MLflow or DVC), not even in a string.

    flows > tasks > pipeline > modelregistry > pipeline_env > evaluation > scenarios > metamerge
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["flows", "tasks", "pipeline", "modelregistry", "pipeline_env", "evaluation", "scenarios", "metamerge"]
TOOLS = ("prefect", "mlflow", "dvc")
# a tool or an upper layer named in the core: as a word, or as a module path (``tasks.x``, ``flows/``)
NAMED = re.compile(r"\b(prefect|mlflow|dvc|modelregistry|pipeline_env)\b"
                   r"|\b(pipeline|tasks|flows|evaluation|scenarios)[./][A-Za-z_]", re.IGNORECASE)


def sources(layer: str) -> list[Path]:
    return [REPO / f"{layer}.py"] if layer == "pipeline_env" else sorted((REPO / layer).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports (absolute imports only; relative stay inside)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    above = set(LAYERS[:LAYERS.index(layer)])
    wrong = {f"{p.relative_to(REPO)} imports {m}" for p in sources(layer) for m in imports(p) & above}
    assert not wrong, sorted(wrong)


def test_the_core_names_no_layer_above_it_and_no_orchestration_tool():
    wrong = []
    for path in sources("metamerge"):
        if imports(path) & set(TOOLS):
            wrong.append(f"{path.relative_to(REPO)} imports {sorted(imports(path) & set(TOOLS))}")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if NAMED.search(line):
                wrong.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not wrong, wrong


def test_tasks_do_not_start_from_flows_and_dvc_stages_do_not_start_prefect():
    assert "flows" not in imports(REPO / "tasks" / "__init__.py")
    for layer in ("pipeline", "evaluation", "scenarios", "modelregistry"):
        assert not any("prefect" in imports(p) for p in sources(layer)), layer
