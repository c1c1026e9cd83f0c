"""``model_stock``, ``arcee_fusion``, ``nearswap`` and ``passthrough`` on plain tensors against float64
formulas written here, and their recipe checks (mergekit parity: tests/parity/test_parity_raw.py)."""

from __future__ import annotations

import math

import pytest
import torch

from metamerge.errors import MergeError
from metamerge.methods import TensorJob, get_method
from metamerge.recipe import parse_recipe

F64 = torch.float64


def _run(method: str, params: dict, base: torch.Tensor | None, models: list[torch.Tensor],
         name: str = "x", per_model: list[dict] | None = None):
    recipe = {"merge_method": method, "models": [{"model": f"m{i}", **({"parameters": p} if p else {})}
                                                 for i, p in enumerate(per_model or [None] * len(models))],
              "parameters": params}
    if base is not None:
        recipe["base_model"] = "b"
    m = get_method(method)(parse_recipe(recipe), num_layers=3)
    globals_, per = m.resolve(name)
    job = TensorJob(name, None if base is None else base.clone(), [x.clone() for x in models], None, per, globals_)
    return m.merge(job)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def test_model_stock_known_angle():
    """Two offsets at 60 degrees: t = 2 cos / (1 + cos) = 2/3 toward their mean, whatever their lengths."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, dtype=F64, generator=g)
    u = _unit(torch.randn(50, dtype=F64, generator=g))
    v = _unit(torch.randn(50, dtype=F64, generator=g))
    v = _unit(v - (v @ u) * u)
    a, b = 2.0 * u, 3.0 * (0.5 * u + math.sqrt(0.75) * v)
    expected = base + (2 / 3) * (a + b) / 2
    got = _run("model_stock", {}, base, [base + a, base + b])
    torch.testing.assert_close(got.tensor, expected, rtol=0, atol=1e-12)
    assert got.coefficients == pytest.approx([1 / 3, 1 / 3], rel=1e-12)   # t / N each
    # three offsets: the mean of the three pairwise cosines, t = 3c / (1 + 2c)
    c3 = 0.2 * u + math.sqrt(0.96) * v
    cos = (float(_unit(a) @ _unit(b)) + float(_unit(a) @ c3) + float(_unit(b) @ c3)) / 3
    t = 3 * cos / (1 + 2 * cos)
    out3 = _run("model_stock", {}, base, [base + a, base + b, base + c3]).tensor
    torch.testing.assert_close(out3, t * (3 * base + a + b + c3) / 3 + (1 - t) * base, rtol=0, atol=1e-12)


def test_model_stock_filter_wise_rows_and_singularity():
    """Per row: a row whose two offsets are opposite (1 + cos = 0) keeps the base; a row whose
    offsets agree takes their mean; without filter_wise one ratio for the whole tensor."""
    base = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=F64)
    d = torch.tensor([0.3, -0.1, 0.2], dtype=F64)
    a = base + torch.stack([d, d])
    b = base + torch.stack([-d, 2 * d])
    out = _run("model_stock", {"filter_wise": True}, base, [a, b]).tensor
    assert torch.equal(out[0], base[0])                                      # cos -1: t = 0
    torch.testing.assert_close(out[1], base[1] + 1.5 * d, rtol=0, atol=1e-12)  # cos 1: t = 1
    whole = _run("model_stock", {}, base, [a, b]).tensor
    flat_a, flat_b = (a - base).reshape(-1), (b - base).reshape(-1)
    cos = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(whole, base + t * ((a + b) / 2 - base), rtol=0, atol=1e-12)
    # a 1-D tensor is one row either way
    v = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    rows = _run("model_stock", {"filter_wise": True}, v, [v + d, v + torch.tensor([0.1, 0.3, 0.0], dtype=F64)])
    flat = _run("model_stock", {}, v, [v + d, v + torch.tensor([0.1, 0.3, 0.0], dtype=F64)])
    torch.testing.assert_close(rows.tensor, flat.tensor, rtol=0, atol=1e-15)


def test_nearswap_elements():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0], dtype=F64)
    b = torch.tensor([0.005, 0.1, -0.02, 1.0, 1.96], dtype=F64)
    t = 0.01
    got = _run("nearswap", {"t": t}, a, [b])
    out = got.tensor
    w = [min(1.0, t / max(abs(x - y), 1e-6)) for x, y in zip(a.tolist(), b.tolist())]
    expected = torch.tensor([wi * y + (1 - wi) * x for wi, x, y in zip(w, a.tolist(), b.tolist())], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert got.coefficients == pytest.approx([sum(w) / len(w)])
    assert out[0] == b[0] and out[3] == 1.0                                  # within t: swapped whole
    torch.testing.assert_close(out[1], torch.tensor(0.01, dtype=F64), rtol=0, atol=1e-15)
    # a gradient: t at layer 1 of 3 is the middle value
    mid = _run("nearswap", {"t": [0.0, 0.02, 0.5]}, a, [b], name="model.layers.1.mlp.up_proj.weight").tensor
    torch.testing.assert_close(mid, _run("nearswap", {"t": 0.02}, a, [b]).tensor, rtol=0, atol=0)


def _arcee_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64: importance |b - a| * KL(softmax(b) + 1e-8 || softmax(a) + 1e-8) per row; keep b's
    elements at or above median + 1.5 IQR of the importances (quartiles at int(q (n - 1)))."""
    rows_a, rows_b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    imp = []
    for ra, rb in zip(rows_a, rows_b):
        p = torch.softmax(rb, dim=0) + 1e-8
        q = torch.softmax(ra, dim=0) + 1e-8
        imp.append((rb - ra).abs() * float((p * (p / q).log()).sum()))
    scores = torch.stack(imp).reshape(-1)
    s = scores.sort().values
    n = s.numel()
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    mask = (scores >= med + 1.5 * (q3 - q1)).reshape(a.shape)
    return a.double() + (b.double() - a.double()) * mask.double()


def test_arcee_fusion_outliers_only():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 16, dtype=F64, generator=g)
    b = a + 0.01 * torch.randn(8, 16, dtype=F64, generator=g)
    b[2, 5] += 3.0   # one large change: an outlier of the importances
    b[6, 1] -= 2.0
    out = _run("arcee_fusion", {}, a, [b]).tensor
    expected = _arcee_reference(a, b)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    taken_mask = (out - a).abs() > 1e-12
    assert taken_mask[2, 5] and taken_mask[6, 1]
    taken = int(taken_mask.sum())
    assert 2 <= taken < b.numel() // 2
    # 1-D: one KL for the whole vector
    v = torch.linspace(-1, 1, 40, dtype=F64)
    w = v + 0.01 * torch.randn(40, dtype=F64, generator=g)
    w[7] += 1.0
    torch.testing.assert_close(_run("arcee_fusion", {}, v, [w]).tensor, _arcee_reference(v, w), rtol=0, atol=0)


def test_passthrough_scale():
    x = torch.randn(4, 3, dtype=F64)
    assert torch.equal(_run("passthrough", {}, None, [x]).tensor, x)
    scale = [{"filter": "o_proj", "value": 0.0}, {"filter": "mlp", "value": [0.5, 1.5]}]
    per = [{"scale": scale}]
    o = _run("passthrough", {}, None, [x], name="model.layers.2.self_attn.o_proj.weight", per_model=per)
    assert not o.tensor.any()
    mlp = _run("passthrough", {}, None, [x], name="model.layers.1.mlp.up_proj.weight", per_model=per)
    torch.testing.assert_close(mlp.tensor, x * 1.0, rtol=0, atol=0)           # gradient at the middle layer
    mlp0 = _run("passthrough", {}, None, [x], name="model.layers.0.mlp.up_proj.weight", per_model=per)
    torch.testing.assert_close(mlp0.tensor, x * 0.5, rtol=0, atol=0)
    # no filter matches: the tensor as it is
    q = _run("passthrough", {}, None, [x], name="model.layers.0.self_attn.q_proj.weight", per_model=per)
    assert torch.equal(q.tensor, x)


@pytest.mark.parametrize("recipe, message", [
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "m0"}]}, "at least two fine-tunes"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "b"}, {"model": "m0"}]},
     "at least two fine-tunes"),
    ({"merge_method": "model_stock", "models": [{"model": "m0"}, {"model": "m1"}]}, "needs base_model"),
    ({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "m0"}, {"model": "m1"}],
      "parameters": {"t": 0.1}}, "exactly one other model"),
    ({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "m0"}]}, "needs parameter 't'"),
    ({"merge_method": "arcee_fusion", "base_model": "b", "models": [{"model": "b"}]}, "no models to merge"),
    ({"merge_method": "arcee_fusion", "base_model": "b", "models": [{"model": "m0"}, {"model": "m1"}]},
     "exactly one other model"),
    ({"merge_method": "passthrough", "models": [{"model": "m0"}, {"model": "m1"}]}, "exactly one model"),
    ({"merge_method": "passthrough", "base_model": "b", "models": [{"model": "m0"}]}, "base_model counts"),
    ({"merge_method": "passthrough", "models": [{"model": "m0", "parameters": {"scale": "big"}}]},
     "'scale' must be a number"),
])
def test_recipe_checks(recipe, message):
    with pytest.raises(MergeError, match=message):
        parse_recipe(recipe)


def test_single_model_forms_accepted():
    parse_recipe({"merge_method": "passthrough", "base_model": "m0", "models": [{"model": "m0"}]})
    parse_recipe({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "b"}, {"model": "m0"}],
                  "parameters": {"t": [0.1, 0.2]}})
