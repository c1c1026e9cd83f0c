"""The model card (README.md) a merged model directory carries: what went in and how to redo it.

It opens with Hugging Face front matter (``huggingface_hub.ModelCard`` parses it, the Hub shows it):
``base_model`` lists every merged model, base first, with ``base_model_relation: merge`` (the Hub's
convention for merges, as mergekit writes it), ``library_name: transformers``, ``tags`` (``merge``,
``metamerge``, the method) and ``merge_method``; with scores, a ``model-index`` of one result per
task and metric, so the Hub and other tools read them without parsing the table.
"""

from __future__ import annotations

import math

import yaml

from .report import MergeReport


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def front_matter(recipe, inputs, scores: dict | None = None) -> dict:
    """The card's metadata (see the module docstring)."""
    refs = ([inputs.base.ref] if inputs.base else []) + [m.ref for m in inputs.models]
    meta: dict = {"base_model": list(dict.fromkeys(str(r) for r in refs)), "base_model_relation": "merge",
                  "library_name": "transformers", "tags": ["merge", "metamerge", str(recipe.merge_method)],
                  "merge_method": str(recipe.merge_method)}
    results = []
    for task, metrics in (scores or {}).items():
        values = [{"type": str(k), "name": str(k), "value": x} for k, v in (metrics or {}).items()
                  if (x := _number(v)) is not None]
        if values:
            results.append({"task": {"type": "text-generation", "name": "text generation"},
                            "dataset": {"name": str(task), "type": str(task)}, "metrics": values})
    if results:
        meta["model-index"] = [{"name": str(recipe.name or "merged"), "results": results}]
    return meta


def render_model_card(recipe, report: MergeReport, inputs, scores: dict | None = None,
                      reproduce: str | None = None) -> str:
    """Front matter, then Markdown: sources with revisions, method, coefficients, optional scores,
    the reproduce command."""
    meta = yaml.safe_dump(front_matter(recipe, inputs, scores), sort_keys=False, allow_unicode=True)
    lines = ["---", meta.rstrip("\n"), "---", "", f"# {recipe.name or 'Merged model'}", "",
             f"Merged with metamerge, method `{recipe.merge_method}`"
             + (f" (granularity `{report.granularity}`)" if report.granularity else "") + ".", "",
             "## Sources", "", "| role | reference | revision |", "|---|---|---|"]
    if inputs.base:
        lines.append(f"| base | `{inputs.base.ref}` | `{inputs.base.revision}` |")
    for m in inputs.models:
        lines.append(f"| fine-tune | `{m.ref}` | `{m.revision}` |")
    coeffs = report.coefficients
    if coeffs:
        lines += ["", f"## {report.coefficients_title}", "", "| model | coefficient | task-vector norm |",
                  "|---|---|---|"]
        norms = report.norms
        for ref, c in coeffs.items():
            lines.append(f"| `{ref}` | {_fmt(c)} | {_fmt(norms.get(ref))} |")
    if scores:
        lines += ["", "## Scores", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in scores.items():
            for k, v in metrics.items():
                lines.append(f"| {task} | {k} | {_fmt(v)} |")
    lines += ["", "## Reproduce", "", "```",
              reproduce or "metamerge merge merge_recipe.yaml OUT_DIR   # recipe and provenance.json are beside this file",
              "```", ""]
    return "\n".join(lines)
