"""Each plot writes a real PNG atomically (no temp file left behind) and returns its path."""

from __future__ import annotations

import pytest

from evaluation.plots import plot_cosine_heatmap, plot_lambdas, plot_linearity, plot_scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png_only(path, out_dir):
    assert path.exists() and path.stat().st_size > 100
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out_dir.iterdir()] == [path.name]  # no temp file left


def test_plot_scores(tmp_path):
    table = {
        "metagpt": {"math": 0.4, "code": 0.3, "chat": None},
        "ties": {"math": 0.35, "code": 0.32, "chat": 0.5},
        "base": {"math": 0.1, "code": 0.1},
        "expert_math": {"math": 0.6, "code": 0.05, "chat": 0.2},
    }
    path = plot_scores(table, tmp_path / "scores.png", ylabel="exact match")
    assert path == tmp_path / "scores.png"
    _assert_png_only(path, tmp_path)


def test_plot_lambdas(tmp_path):
    names = [f"model.layers.{i}.{w}" for i in range(3) for w in ("q_proj", "mlp.up_proj")] + ["lm_head"]
    lambdas = {n: {"math": 0.2 + 0.05 * i, "code": 0.8 - 0.05 * i} for i, n in enumerate(names)}
    path = plot_lambdas(lambdas, tmp_path / "lambdas.png")
    _assert_png_only(path, tmp_path)


def test_plot_lambdas_many_tensors(tmp_path):
    lambdas = {f"t{i}": {"a": 0.5, "b": 0.5} for i in range(300)}
    _assert_png_only(plot_lambdas(lambdas, tmp_path / "many.png"), tmp_path)


def test_plot_cosine_heatmap(tmp_path):
    matrix = [[1.0, 0.02, -0.1], [0.02, 1.0, 0.7], [-0.1, 0.7, 1.0]]
    path = plot_cosine_heatmap(matrix, ["math", "code", "chat"], tmp_path / "sub" / "cos.png")
    _assert_png_only(path, tmp_path / "sub")
    with pytest.raises(ValueError, match="3x3"):
        plot_cosine_heatmap(matrix[:2], ["math", "code", "chat"], tmp_path / "bad.png")


def test_plot_linearity(tmp_path):
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = {"math": [3.0, 2.5, 2.2, 2.05, 2.0], "code": [3.0, 2.9, 2.7, 2.4, 2.0]}
    path = plot_linearity(alphas, losses, tmp_path / "lin.png")
    _assert_png_only(path, tmp_path)
    with pytest.raises(ValueError, match="has 2 values for 5 alphas"):
        plot_linearity(alphas, {"x": [1.0, 2.0]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overwrite_existing(tmp_path):
    target = tmp_path / "s.png"
    target.write_bytes(b"old")
    plot_scores({"m": {"t": 1.0}}, target)
    _assert_png_only(target, tmp_path)


# --------------------------------------------------------------------------------------------
# labels are model names; legends never cover the data
# --------------------------------------------------------------------------------------------


def test_model_labels_are_short_and_unique():
    from evaluation.plots import model_labels

    assert model_labels(["merged", "/data/runs/ft-math", "/data/runs/ft-code/", "org/llama@" + "3f2a9c1e" * 5]) == [
        "merged", "ft-math", "ft-code", "llama@3f2a9c1"]
    # two models of one name keep the folders that tell them apart
    assert model_labels(["/a/x/model", "/b/x/model", "/c/other"]) == ["a/x/model", "b/x/model", "other"]


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _assert_legend_outside(fig, expected_labels):
    renderer = _drawn(fig)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == expected_labels
    box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= area.x1  # entirely right of the axes: no bar or line under it


def test_score_bars_are_labelled_by_model_name_with_the_legend_outside(tmp_path):
    from evaluation.plots import plot_scores, scores_figure

    table = {"merged": {"add": 0.9, "rev": 0.8}, "base": {"add": 0.1, "rev": 0.1},
             str(tmp_path / "models" / "ft-add"): {"add": 1.0, "rev": 0.0},
             str(tmp_path / "models" / "ft-rev"): {"add": 0.0, "rev": 1.0}}
    fig = scores_figure(table)
    _assert_legend_outside(fig, ["merged", "base", "ft-add", "ft-rev"])
    assert all(str(tmp_path) not in t.get_text() for t in fig.axes[0].get_xticklabels())
    out = tmp_path / "png"
    _assert_png_only(plot_scores(table, out / "s.png"), out)


def test_lambda_and_linearity_lines_and_cosine_ticks_use_model_names(tmp_path):
    from evaluation.plots import cosine_figure, lambdas_figure, linearity_figure

    a, b = str(tmp_path / "ft-a"), str(tmp_path / "ft-b")
    _assert_legend_outside(lambdas_figure({"t0": {a: 0.4, b: 0.6}, "t1": {a: 0.5, b: 0.5}}), ["ft-a", "ft-b"])
    _assert_legend_outside(linearity_figure([0.0, 1.0], {a: [3.0, 2.0], b: [3.0, 2.5]}),
                           ["ft-a", "ft-b", "chord (linear)"])
    fig = cosine_figure([[1.0, 0.1], [0.1, 1.0]], [a, b])
    _drawn(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["ft-a", "ft-b"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["ft-a", "ft-b"]
