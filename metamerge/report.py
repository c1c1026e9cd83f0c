"""The merge report: one typed record of what a merge did, read by everyone who shows it.

The engine writes it as ``merge_report.json`` beside the merged weights; the CLI, the model card,
every report, plot and model-version record reads it back through ``MergeReport.load`` rather
than picking keys out of a dict, so a key renamed here is renamed everywhere. The JSON layout is
``format: 1`` (unchanged since the first release), so older merges stay readable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_FILE = "merge_report.json"


@dataclass
class MergeReport:
    """What a merge did.

    ``model`` holds whole-model figures: ``sqnorms``/``norms``/``cosine`` of the raw task vectors
    (the orthogonality check; absent for methods that see no base), and either ``lambdas`` (a method
    with one coefficient per model for the whole model, such as MetaGPT at ``granularity: model``)
    or ``coefficients_mean`` (per-tensor coefficients averaged over tensors). ``tensors`` maps each
    tensor name to its ``coefficients``, ``norms`` and ``cosine``.
    """

    method: str
    models: list[str]
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    granularity: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    diagnostics_of: str | None = None
    format: int = 1

    @property
    def coefficients(self) -> dict[str, float]:
        """One coefficient per merged model: whole-model lambdas if the method has them, else the
        mean of the per-tensor coefficients; empty when the method reports none."""
        return dict(self.model.get("lambdas") or self.model.get("coefficients_mean") or {})

    @property
    def coefficients_title(self) -> str:
        """How to label ``coefficients`` in a table or plot."""
        if self.model.get("lambdas"):
            return f"{self.method} coefficients (whole model)"
        return f"{self.method} coefficients (mean over tensors)"

    @property
    def norms(self) -> dict[str, float]:
        """Whole-model ``||tau_t||`` of each fine-tune's raw task vector (empty without a base)."""
        return dict(self.model.get("norms") or {})

    @property
    def cosine(self) -> list[list[float | None]] | None:
        """Whole-model cosine similarity of the raw task vectors, in ``models`` order."""
        return self.model.get("cosine")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeReport:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> MergeReport:
        """Read the report of a merged model directory (or a report file given directly)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
