"""PNG plots of merge results and of MetaGPT's diagnostics (matplotlib, Agg, no pyplot).

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: pyplot keeps
global figure state and picks a GUI backend, neither of which a pipeline worker wants. Saving a
bare ``Figure`` to PNG renders with Agg. Every function writes atomically (``metamerge.atomic``),
so a tracked plot is never half written, and returns the path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from metamerge.atomic import atomic_file

__all__ = ["plot_scores", "plot_lambdas", "plot_cosine_heatmap", "plot_linearity", "plot_output_linearity"]

PathLike = str | os.PathLike

_MAX_NAMED_TICKS = 40  # beyond this many tensors, tick labels become unreadable: show indices


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


def plot_scores(
    scores_table: Mapping[str, Mapping[str, float | None]],
    path: PathLike,
    *,
    average: bool = True,
    title: str = "Scores per task",
    ylabel: str = "score",
) -> Path:
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
    for i, method in enumerate(methods):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, [_as_float(v) for v in values[method]], width=width, label=method)
    ax.set_xticks(range(len(columns)), columns, rotation=20 if len(columns) > 6 else 0)
    if average:
        ax.axvline(len(tasks) - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(4, len(methods)), loc="best")
    return _save(fig, path)


def plot_lambdas(
    lambdas_per_tensor: Mapping[str, Mapping[str, float]],
    path: PathLike,
    *,
    title: str = "MetaGPT lambda per tensor",
) -> Path:
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
    for model in models:
        ys = [_as_float(lambdas_per_tensor[n].get(model)) for n in names]
        ax.plot(xs, ys, marker="." if len(names) <= 200 else None, linewidth=1, label=model)
    if len(names) <= _MAX_NAMED_TICKS:
        ax.set_xticks(xs, names, rotation=90, fontsize="x-small")
    ax.set_xlabel("tensor (in order)")
    ax.set_ylabel("lambda")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def plot_cosine_heatmap(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[str],
    path: PathLike,
    *,
    title: str = "Cosine similarity of task vectors",
) -> Path:
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
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            value = data[i][j]
            color = "white" if math.isfinite(value) and abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize="small", color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return _save(fig, path)


def plot_linearity(
    alphas: Sequence[float],
    losses_per_model: Mapping[str, Sequence[float]],
    path: PathLike,
    *,
    title: str = "Loss along theta_0 + alpha * tau_t (curved even when outputs are linear)",
    ylabel: str = "loss",
) -> Path:
    """Loss against alpha per model, with the straight chord between its end points (dashed).

    MetaGPT's derivation assumes the model is linear along its task vector; the gap between a
    curve and its chord is how far a (small) model is from that regime.
    """
    alphas = [float(a) for a in alphas]
    if len(alphas) < 2:
        raise ValueError("plot_linearity: need at least two alphas")
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for model, losses in losses_per_model.items():
        ys = [float(v) for v in losses]
        if len(ys) != len(alphas):
            raise ValueError(f"plot_linearity: {model!r} has {len(ys)} losses for {len(alphas)} alphas")
        (line,) = ax.plot(alphas, ys, marker="o", label=model)
        ax.plot([alphas[0], alphas[-1]], [ys[0], ys[-1]], linestyle="--", color=line.get_color(),
                linewidth=1, alpha=0.7)
    ax.plot([], [], linestyle="--", color="grey", label="chord (linear)")
    ax.set_xlabel("alpha")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def plot_output_linearity(
    alphas: Sequence[float],
    errors_per_model: Mapping[str, Sequence[float]],
    path: PathLike,
    *,
    title: str = "Outputs along theta_0 + alpha * tau_t: distance from linear",
) -> Path:
    """The paper's linearity check on outputs: ``||z(alpha) - chord|| / ||z(1) - z(0)||`` against
    alpha per model (0 at both ends by construction; 0 throughout for linear outputs)."""
    alphas = [float(a) for a in alphas]
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for model, errs in errors_per_model.items():
        ys = [float(v) for v in errs]
        if len(ys) != len(alphas):
            raise ValueError(f"plot_output_linearity: {model!r} has {len(ys)} values for {len(alphas)} alphas")
        ax.plot(alphas, ys, marker="o", label=model)
    ax.set_xlabel("alpha")
    ax.set_ylabel("||z(alpha) - chord|| / ||z(1) - z(0)||")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)
