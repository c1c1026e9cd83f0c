"""The model card (README.md) a merged model directory carries: what went in and how to redo it."""

from __future__ import annotations

from .report import MergeReport


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def render_model_card(recipe, report: MergeReport, inputs, scores: dict | None = None,
                      reproduce: str | None = None) -> str:
    """Markdown: sources with revisions, method, coefficients, optional scores, reproduce command."""
    lines = [f"# {recipe.name or 'Merged model'}", "",
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
