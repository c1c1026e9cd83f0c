"""The spherical methods (slerp, nuslerp, multislerp, karcher) against float64 formulas written here,
on plain tensors and through the engine, and their recipe checks. Parity with mergekit itself is
in ``tests/parity/test_parity_spherical.py``."""

from __future__ import annotations

import math

import pytest
import torch

from metamerge.errors import MergeError
from metamerge.methods.karcher import karcher_mean
from metamerge.methods.multislerp import multislerp
from metamerge.methods.nuslerp import nuslerp
from metamerge.methods.slerp import slerp
from metamerge.recipe import parse_recipe

from models import layer_of, load_state, run_merge


def slerp64(t: float, v0: torch.Tensor, v1: torch.Tensor, threshold: float | None = 0.9995) -> torch.Tensor:
    """sin((1-t)theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1 over the flattened tensors, float64;
    (1-t) v0 + t v1 when |cos theta| > threshold (None: when exactly parallel)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm().item(), b.norm().item()
    cos = max(-1.0, min(1.0, torch.dot(a / (na if na > 1e-8 else 1), b / (nb if nb > 1e-8 else 1)).item()))
    if (threshold is None and 1 - cos * cos <= 1e-16) or (threshold is not None and abs(cos) > threshold):
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)).reshape(v0.shape)


# ------------------------------------------------------------------------------ plain tensors


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0, 1.3])
def test_slerp_known_angle(dtype, tol, t):
    """Two vectors 60 degrees apart, norms 3 and 2: the interpolant is in closed form."""
    v0 = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=dtype)
    v1 = torch.tensor([[1.0, math.sqrt(3.0)], [0.0, 0.0]], dtype=dtype)
    theta = math.pi / 3
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    want = torch.tensor([[3 * c0 + c1, math.sqrt(3.0) * c1], [0.0, 0.0]], dtype=torch.float64)
    out = slerp(t, v0, v1)
    assert out.dtype == dtype and out.shape == v0.shape
    assert (out.double() - want).abs().max().item() <= tol * 3
    assert torch.allclose(out.double(), slerp64(t, v0, v1), atol=tol * 3, rtol=0)


def test_slerp_random_and_parallel():
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    assert torch.allclose(slerp(0.3, v0, v1).double(), slerp64(0.3, v0, v1), atol=1e-6, rtol=0)
    # |cos| > 0.9995: a straight line, not a division by sin(theta) ~ 0
    near = v0 * 2 + 1e-4 * v1
    assert torch.allclose(slerp(0.3, v0, near).double(), 0.7 * v0.double() + 0.3 * near.double(), atol=1e-6, rtol=0)
    anti = -v0
    assert torch.allclose(slerp(0.25, v0, anti).double(), 0.5 * v0.double(), atol=1e-6, rtol=0)


def test_nuslerp_rows_columns_and_flat():
    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    v1[2] = 3 * v0[2]  # one row exactly parallel: that row is a straight line
    t = 0.7
    rows = torch.stack([slerp64(t, v0[i], v1[i], threshold=None) for i in range(4)])
    assert torch.allclose(nuslerp(t, v0, v1).double(), rows, atol=1e-5, rtol=0)
    assert torch.allclose(nuslerp(t, v0, v1)[2].double(), (1 - t) * v0[2].double() + t * v1[2].double(),
                          atol=1e-6, rtol=0)
    cols = torch.stack([slerp64(t, v0[:, j], v1[:, j], threshold=None) for j in range(6)], dim=1)
    assert torch.allclose(nuslerp(t, v0, v1, dim=0).double(), cols, atol=1e-5, rtol=0)
    flat = nuslerp(t, v0, v1, flatten=True)
    assert torch.allclose(flat.double(), slerp64(t, v0, v1, threshold=None), atol=1e-5, rtol=0)
    # a 1-D tensor (a norm weight) is one vector whichever way
    assert torch.allclose(nuslerp(t, v0[0], v1[0], dim=0).double(), slerp64(t, v0[0], v1[0]), atol=1e-6, rtol=0)


def test_multislerp_known_answers():
    e = torch.eye(3, dtype=torch.float64)
    # two orthogonal vectors, equal weights: the arc's midpoint, at the mean norm
    out = multislerp([2 * e[0], 4 * e[1]], [1.0, 1.0])
    assert torch.allclose(out, (e[0] + e[1]) / math.sqrt(2) * 3, atol=1e-12)
    # three orthogonal vectors, weights normalised (or not, when they already sum to 1)
    out = multislerp([e[0], e[1], e[2]], [0.2, 0.2, 0.2])
    assert torch.allclose(out, torch.ones(3, dtype=torch.float64) / math.sqrt(3), atol=1e-12)
    raw = multislerp([e[0], e[1], e[2]], [0.5, 0.25, 0.25], normalize_weights=False)
    assert torch.allclose(raw, multislerp([e[0], e[1], e[2]], [2.0, 1.0, 1.0]), atol=1e-15)
    # with a base, the task vectors are interpolated and the base added back
    base = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    out = multislerp([base + 2 * e[0], base + 4 * e[1]], [1.0, 1.0], base=base)
    assert torch.allclose(out, base + (e[0] + e[1]) / math.sqrt(2) * 3, atol=1e-12)
    # one model is returned as it is; two antipodal ones with equal weights fall back to the sum
    assert multislerp([base], [0.3]) is base
    assert torch.allclose(multislerp([e[0], -e[0]], [1.0, 1.0]), torch.zeros(3, dtype=torch.float64))
    # every input equal to the base (a tensor no adapter touched): the base, whatever the count
    assert torch.equal(multislerp([base.clone(), base.clone(), base.clone()], [1.0, 1.0, 1.0], base=base), base)
    assert torch.equal(multislerp([torch.zeros(3, dtype=torch.float64)] * 3, [1.0, 2.0, 3.0]),
                       torch.zeros(3, dtype=torch.float64))
    with pytest.raises(MergeError, match="weighted mean direction"):
        multislerp([e[0], -e[0], e[1], -e[1]], [1.0] * 4)


def karcher_residual(out: torch.Tensor, xs: list[torch.Tensor], alphas: list[float]) -> float:
    """|sum_i a_i log_m(u_i)| at m = out/|out| (float64): zero at the Karcher mean."""
    m = out.double().reshape(-1) / out.double().norm()
    res = torch.zeros_like(m)
    for a, x in zip(alphas, xs):
        u = x.double().reshape(-1) / x.double().norm()
        cos = torch.clamp(torch.dot(m, u), -1, 1)
        theta = torch.arccos(cos)
        if theta > 1e-12:
            res += a * theta / torch.sin(theta) * (u - cos * m)
    return res.norm().item()


def test_karcher_mean():
    e = torch.eye(3, dtype=torch.float64)
    # two points: the geodesic midpoint; three symmetric ones: their centre; scaled by the mean norm
    assert torch.allclose(karcher_mean([e[0], 3 * e[1]], [0.5, 0.5]), (e[0] + e[1]) / math.sqrt(2) * 2, atol=1e-12)
    assert torch.allclose(karcher_mean([e[0], e[1], 2 * e[2]], [1 / 3] * 3),
                          torch.ones(3, dtype=torch.float64) / math.sqrt(3) * 4 / 3, atol=1e-10)
    # asymmetric: after enough iterations the Riemannian gradient vanishes (the mean is not the
    # normalised Euclidean mean it starts from)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    alphas = [1 / 3] * 3
    start = karcher_mean(xs, alphas, max_iter=0)
    out = karcher_mean(xs, alphas, max_iter=50, tol=1e-12)
    assert karcher_residual(out, xs, alphas) < 1e-9 < karcher_residual(start, xs, alphas)
    scale = sum(a * x.norm() for a, x in zip(alphas, xs))
    assert math.isclose(out.norm().item(), scale.item(), rel_tol=1e-12)
    # an input of norm <= tol leaves the direction but counts in the norm; all of them: zero
    tiny = karcher_mean([e[0], e[1], 1e-7 * e[2]], [1 / 3] * 3)
    assert torch.allclose(tiny, (e[0] + e[1]) / math.sqrt(2) * (2 + 1e-7) / 3, atol=1e-12)
    assert torch.equal(karcher_mean([1e-7 * e[0], 1e-7 * e[1]], [0.5, 0.5]), torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------------------ through the engine


def test_slerp_engine_gradient(tiny_llama_fp32, tmp_path):
    """t: [0.1, 0.9] over the layers; tensors no fine-tune changed are parallel: a straight line."""
    fam = tiny_llama_fp32
    recipe = {"merge_method": "slerp", "base_model": str(fam.base),
              "models": [{"model": str(fam.base)}, {"model": fam.refs[1]}], "parameters": {"t": [0.1, 0.9]}}
    run_merge(recipe, tmp_path / "out")
    out, base, ft = load_state(tmp_path / "out"), load_state(fam.base), load_state(fam.finetunes[1])
    for name in base:
        layer = layer_of(name)
        t = 0.1 if layer is None else 0.1 + 0.8 * layer / (fam.num_layers - 1)
        want = slerp64(t, base[name], ft[name])
        assert out[name].dtype == torch.float32
        assert (out[name].double() - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item()), name
    for name in fam.unchanged:
        assert torch.allclose(out[name], base[name], atol=1e-6, rtol=0), name


def test_nuslerp_and_multislerp_engine(tiny_llama_bf16, tmp_path):
    """Around a base: base + nuslerp of the task vectors at t = w1/(w0+w1); multislerp of the same two
    task vectors with the same weights differs (it renormalises)."""
    fam = tiny_llama_bf16
    models = [{"model": fam.refs[0], "parameters": {"weight": 1.0}},
              {"model": fam.refs[1], "parameters": {"weight": 3.0}}]
    common = {"base_model": str(fam.base), "models": models, "dtype": "float32"}
    run_merge({"merge_method": "nuslerp", **common}, tmp_path / "nu")
    run_merge({"merge_method": "multislerp", **common}, tmp_path / "multi")
    nu, multi = load_state(tmp_path / "nu"), load_state(tmp_path / "multi")
    base, fts = load_state(fam.base), [load_state(p) for p in fam.finetunes]
    for name in base:
        b = base[name].double()
        d0, d1 = fts[0][name].double() - b, fts[1][name].double() - b
        want = b + slerp64(0.75, d0, d1, threshold=None)
        assert (nu[name].double() - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item()), name
    changed = [n for n in base if n not in fam.unchanged]
    assert max((nu[n] - multi[n]).abs().max().item() for n in changed) > 1e-4


def test_karcher_engine_appends_the_base(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    recipe = {"merge_method": "karcher", "base_model": str(fam.base), "models": [{"model": m} for m in fam.refs[:2]],
              "parameters": {"max_iter": 20, "tol": 1e-7}}
    run_merge(recipe, tmp_path / "out")
    out = load_state(tmp_path / "out")
    inputs = [load_state(p) for p in [*fam.finetunes[:2], fam.base]]
    for name in out:
        xs = [s[name] for s in inputs]
        assert karcher_residual(out[name], xs, [1 / 3] * 3) < 1e-6, name  # 6e-4 before iterating


# ------------------------------------------------------------------------------ recipe checks


def recipe(method, models, base=None, **params):
    data = {"merge_method": method, "models": [{"model": m, **({"parameters": p} if p else {})} for m, p in models],
            "parameters": params}
    if base:
        data["base_model"] = base
    return data


@pytest.mark.parametrize("data,fragment", [
    (recipe("slerp", [("a", None), ("b", None)], base="c", t=0.5), "exactly one other model"),
    (recipe("slerp", [("a", None), ("b", None)], t=0.5), "needs base_model"),
    (recipe("slerp", [("a", None)], base="c"), "needs parameter 't'"),
    (recipe("slerp", [("a", {"t": 0.5})], base="c"), "it is global"),
    (recipe("nuslerp", [("a", {"weight": 1}), ("b", {"weight": 1}), ("c", {"weight": 1})]), "exactly two models"),
    (recipe("nuslerp", [("a", {"weight": 1})], base="c"), "exactly two models besides base_model"),
    (recipe("nuslerp", [("a", {"weight": 1}), ("b", None)]), "needs parameter 'weight'"),
    (recipe("multislerp", [("a", None), ("b", None)]), "needs parameter 'weight'"),
    (recipe("multislerp", [("a", {"weight": 1})], eps=-1), "'eps'"),
    (recipe("karcher", [("a", None), ("b", None)], max_iter=2.5), "must be an integer"),
    (recipe("karcher", [("a", None), ("b", None)], max_iter=-1), "'max_iter'"),
])
def test_recipe_checks(data, fragment):
    with pytest.raises(MergeError) as info:
        parse_recipe(data, "r.yaml")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_slerp_base_listed_counts_once():
    r = parse_recipe(recipe("slerp", [("a", None), ("b", None)], base="a", t=0.5))
    assert r.merge_method == "slerp"
    parse_recipe(recipe("nuslerp", [("a", {"weight": 1}), ("b", {"weight": 2}), ("c", None)], base="c"))


def test_multislerp_weights_summing_to_zero(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    data = recipe("multislerp", [(fam.refs[0], {"weight": 1.0}), (fam.refs[1], {"weight": -1.0})])
    with pytest.raises(MergeError, match="sum to 0"):
        run_merge(data, tmp_path / "out")
    run_merge({**data, "parameters": {"normalize_weights": False}}, tmp_path / "raw")
