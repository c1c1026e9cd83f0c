"""Why a reproduction is not bit-identical: which tensors differ, by how much, and the likely cause.

A file hash only says *that* weights differ. Comparing the recorded and reproduced safetensors
tensor by tensor names the tensors, and the size of the difference points at the cause: the merge
code is deterministic on any CPU thread or core count (metamerge.reduce), so what is left is a
different device kind, library version or project commit (recorded in provenance.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {n: (folder / f, n) for n, f in weight_map.items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(str(single), "pt") as fh:
        return {n: (single, n) for n in fh.keys()}


def tensor_differences(recorded: str | Path, reproduced: str | Path, limit: int = 20) -> list[dict[str, Any]]:
    """The tensors whose bytes differ between two merge outputs (at most ``limit``), each with its
    largest absolute difference; a tensor present in only one of them has ``max_abs_diff`` None."""
    from safetensors import safe_open

    a, b = _tensors(Path(recorded)), _tensors(Path(reproduced))
    out: list[dict[str, Any]] = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            out.append({"tensor": name, "max_abs_diff": None})
        else:
            with safe_open(str(a[name][0]), "pt") as fa, safe_open(str(b[name][0]), "pt") as fb:
                x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                out.append({"tensor": name, "max_abs_diff": None})
            elif not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
                out.append({"tensor": name, "max_abs_diff": float((x.double() - y.double()).abs().max())})
        if len(out) >= limit:
            break
    return out


def likely_cause(notes: list[str], differences: list[dict[str, Any]]) -> str:
    """One sentence: the recorded-vs-now differences in device, versions or commit if there are any,
    else a hint that the inputs or the merge code changed in a way the records do not show."""
    if notes:
        return "; ".join(notes)
    if any(d["max_abs_diff"] is None for d in differences):
        return "tensor names, shapes or dtypes differ: the recipe or the merge code changed"
    return ("same device kind, versions and commit, and thread counts do not change the bytes: "
            "an input changed on disk, or the merge code has a nondeterministic step (report it)")
