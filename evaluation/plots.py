"""PNG plots of merge results and of MetaGPT's diagnostics (matplotlib, Agg, no pyplot).

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: pyplot keeps
global figure state and picks a GUI backend, neither of which a pipeline worker wants. Saving a
bare ``Figure`` to PNG renders with Agg. Every function writes atomically (``metamerge.atomic``),
so a tracked plot is never half written, and returns the path.

Models are labelled by name, not by where they live: a reference ``/data/runs/ft-math`` shows as
``ft-math`` and ``org/model@3f2a9c1e...`` as ``model@3f2a9c1`` (:func:`model_labels`; two models of
one name keep as many parent folders as tells them apart). Legends sit outside the axes, to the
right, so they never cover a bar or a line (``bbox_inches="tight"`` widens the PNG to hold them).
Each ``plot_*`` has a ``*_figure`` twin that returns the ``Figure`` unsaved (the tests measure it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from metamerge.atomic import atomic_file

__all__ = ["plot_scores", "plot_lambdas", "plot_cosine_heatmap", "plot_linearity", "plot_output_linearity",
           "scores_figure", "lambdas_figure", "cosine_figure", "linearity_figure", "output_linearity_figure",
           "model_labels"]

PathLike = str | os.PathLike

_MAX_NAMED_TICKS = 40  # beyond this many tensors, tick labels become unreadable: show indices


def model_labels(refs: Sequence[str]) -> list[str]:
    """Short, unique display names of model references (paths or hub ids with ``@revision``)."""
    def parts(ref: str) -> tuple[list[str], str]:
        name, _, rev = str(ref).partition("@")
        return [p for p in name.replace("\\", "/").rstrip("/").split("/") if p] or [name], rev[:7]

    split = [parts(r) for r in refs]
    depth = [1] * len(refs)
    while True:
        labels = ["/".join(ps[-d:]) + (f"@{rev}" if rev else "") for (ps, rev), d in zip(split, depth)]
        clashes = {lab for lab in labels if labels.count(lab) > 1}
        grow = [i for i, lab in enumerate(labels) if lab in clashes and depth[i] < len(split[i][0])]
        if not grow:
            return labels
        for i in grow:
            depth[i] += 1


def _legend_outside(ax) -> None:
    """The legend right of the axes, top-aligned: it never hides data."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Figure, path: PathLike) -> Path:
    """Render to a temp PNG next to ``path`` and move it into place."""
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _as_float(value: float | None) -> float:
    """None (an undefined score) plots as a gap, not as 0."""
    return math.nan if value is None else float(value)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(defined) / len(defined) if defined else None


def plot_scores(scores_table: Mapping[str, Mapping[str, float | None]], path: PathLike, **kw) -> Path:
    """:func:`scores_figure` saved as a PNG at ``path``."""
    return _save(scores_figure(scores_table, **kw), path)


def scores_figure(
    scores_table: Mapping[str, Mapping[str, float | None]],
    *,
    average: bool = True,
    title: str = "Scores per task",
    ylabel: str = "score",
) -> Figure:
    """Grouped bars: one group per task (plus ``average``), one bar per method/model.

    ``scores_table`` is ``{method: {task: value}}`` (rows = methods, e.g. merged, base, experts or
    several merge methods). Tasks are taken in first-seen order; a missing or ``None`` value leaves
    a gap. The average column is each method's mean over its defined task values.
    """
    if not scores_table:
        raise ValueError("plot_scores: empty scores table")
    methods = list(scores_table)
    tasks = list(dict.fromkeys(t for row in scores_table.values() for t in row))
    columns = tasks + (["average"] if average else [])
    values = {
        m: [scores_table[m].get(t) for t in tasks]
        + ([_mean_defined([scores_table[m].get(t) for t in tasks])] if average else [])
        for m in methods
    }

    fig = Figure(figsize=(max(6.0, 1.2 + 0.35 * len(columns) * len(methods)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, (method, label) in enumerate(zip(methods, model_labels(methods))):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, [_as_float(v) for v in values[method]], width=width, label=label)
    ax.set_xticks(range(len(columns)), columns, rotation=20 if len(columns) > 6 else 0)
    if average:
        ax.axvline(len(tasks) - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_lambdas(lambdas_per_tensor: Mapping[str, Mapping[str, float]], path: PathLike, **kw) -> Path:
    """:func:`lambdas_figure` saved as a PNG at ``path``."""
    return _save(lambdas_figure(lambdas_per_tensor, **kw), path)


def lambdas_figure(
    lambdas_per_tensor: Mapping[str, Mapping[str, float]],
    *,
    title: str = "MetaGPT lambda per tensor",
) -> Figure:
    """One line per model: its lambda at each tensor, x = tensor index in the given (layer) order.

    With per-tensor granularity this shows where each fine-tune dominates; with whole-model
    granularity the lines are flat, which is itself a useful check.
    """
    if not lambdas_per_tensor:
        raise ValueError("plot_lambdas: no tensors")
    names = list(lambdas_per_tensor)
    models = list(dict.fromkeys(m for row in lambdas_per_tensor.values() for m in row))
    fig = Figure(figsize=(max(7.0, min(20.0, 0.15 * len(names))), 4.5))
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    for model, label in zip(models, model_labels(models)):
        ys = [_as_float(lambdas_per_tensor[n].get(model)) for n in names]
        ax.plot(xs, ys, marker="." if len(names) <= 200 else None, linewidth=1, label=label)
    if len(names) <= _MAX_NAMED_TICKS:
        ax.set_xticks(xs, names, rotation=90, fontsize="x-small")
    ax.set_xlabel("tensor (in order)")
    ax.set_ylabel("lambda")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_cosine_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], path: PathLike,
                        **kw) -> Path:
    """:func:`cosine_figure` saved as a PNG at ``path``."""
    return _save(cosine_figure(matrix, labels, **kw), path)


def cosine_figure(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[str],
    *,
    title: str = "Cosine similarity of task vectors",
) -> Figure:
    """Annotated heatmap on a fixed [-1, 1] scale, so runs are comparable at a glance.

    MetaGPT assumes task vectors are near orthogonal: off-diagonal values far from 0 warn that its
    closed-form lambdas are not optimal for this set of models.
    """
    n = len(labels)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"plot_cosine_heatmap: matrix must be {n}x{n} to match {n} labels")
    data = [[_as_float(v) for v in row] for row in matrix]
    fig = Figure(figsize=(1.6 + 0.9 * n, 1.2 + 0.8 * n))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    names = model_labels(labels)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            value = data[i][j]
            color = "white" if math.isfinite(value) and abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize="small", color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return fig


def plot_linearity(alphas: Sequence[float], losses_per_model: Mapping[str, Sequence[float]], path: PathLike,
                   **kw) -> Path:
    """:func:`linearity_figure` saved as a PNG at ``path``."""
    return _save(linearity_figure(alphas, losses_per_model, **kw), path)


def _curves_figure(alphas: Sequence[float], values_per_model: Mapping[str, Sequence[float]], *, what: str,
                   title: str, ylabel: str, chords: bool) -> Figure:
    """One line per model against alpha (with its dashed chord between the end points if
    ``chords``); ``what`` names the plot in errors."""
    alphas = [float(a) for a in alphas]
    if len(alphas) < 2:
        raise ValueError(f"{what}: need at least two alphas")
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for (model, values), label in zip(values_per_model.items(), model_labels(list(values_per_model))):
        ys = [float(v) for v in values]
        if len(ys) != len(alphas):
            raise ValueError(f"{what}: {model!r} has {len(ys)} values for {len(alphas)} alphas")
        (line,) = ax.plot(alphas, ys, marker="o", label=label)
        if chords:
            ax.plot([alphas[0], alphas[-1]], [ys[0], ys[-1]], linestyle="--", color=line.get_color(),
                    linewidth=1, alpha=0.7)
    if chords:
        ax.plot([], [], linestyle="--", color="grey", label="chord (linear)")
    ax.set_xlabel("alpha")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def linearity_figure(
    alphas: Sequence[float],
    losses_per_model: Mapping[str, Sequence[float]],
    *,
    title: str = "Loss along theta_0 + alpha * tau_t (curved even when outputs are linear)",
    ylabel: str = "loss",
) -> Figure:
    """Loss against alpha per model, with the straight chord between its end points (dashed).

    MetaGPT's derivation assumes the model is linear along its task vector; the gap between a
    curve and its chord is how far a (small) model is from that regime.
    """
    return _curves_figure(alphas, losses_per_model, what="plot_linearity", title=title, ylabel=ylabel, chords=True)


def plot_output_linearity(alphas: Sequence[float], errors_per_model: Mapping[str, Sequence[float]], path: PathLike,
                          **kw) -> Path:
    """:func:`output_linearity_figure` saved as a PNG at ``path``."""
    return _save(output_linearity_figure(alphas, errors_per_model, **kw), path)


def output_linearity_figure(
    alphas: Sequence[float],
    errors_per_model: Mapping[str, Sequence[float]],
    *,
    title: str = "Outputs along theta_0 + alpha * tau_t: distance from linear",
) -> Figure:
    """The paper's linearity check on outputs: ``||z(alpha) - chord|| / ||z(1) - z(0)||`` against
    alpha per model (0 at both ends by construction; 0 throughout for linear outputs)."""
    return _curves_figure(alphas, errors_per_model, what="plot_output_linearity", title=title,
                          ylabel="||z(alpha) - chord|| / ||z(1) - z(0)||", chords=False)
