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
    with pytest.raises(ValueError, match="losses for 5 alphas"):
        plot_linearity(alphas, {"x": [1.0, 2.0]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overwrite_existing(tmp_path):
    target = tmp_path / "s.png"
    target.write_bytes(b"old")
    plot_scores({"m": {"t": 1.0}}, target)
    _assert_png_only(target, tmp_path)
