"""``sce``, ``ram`` and ``ramplus_tl`` on plain tensors against float64 formulas written here (their
mergekit parity is tests/parity/test_parity_sce_ram.py)."""

from __future__ import annotations

import pytest
import torch

from metamerge.methods import TensorJob, get_method
from metamerge.recipe import parse_recipe


def _job(method: str, params: dict, base: torch.Tensor, fts: list[torch.Tensor]):
    recipe = parse_recipe({"merge_method": method, "base_model": "b",
                                    "models": [{"model": f"m{i}"} for i in range(len(fts))], "parameters": params})
    m = get_method(method)(recipe, num_layers=1)
    globals_, per = m.resolve("x")
    deltas = [f - base for f in fts]
    return m.merge(TensorJob("x", base.clone(), [], deltas, per, globals_))


def test_ram_unit():
    base = torch.zeros(6, dtype=torch.float64)
    a = torch.tensor([0.5, 0.0, 0.3, -0.2, 1e-6, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.4, 0.1, 0.6, 0.0, 0.0], dtype=torch.float64)
    c = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = _job("ram", {}, base, [a, b, c]).tensor
    # unique entries whole, shared ones averaged over contributors, 1e-6 is below epsilon 1e-5
    expected = torch.tensor([0.5, 0.4, (0.3 + 0.1 + 0.2) / 3, (-0.2 + 0.6) / 2, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    # ramplus_tl: a has 1 unique, 2 shared -> rho 2 -> clamped to alpha; b 1 unique, 2 shared; c 0 unique
    r, alpha = 0.5, 1.5
    got = _job("ramplus_tl", {"r": r, "alpha": alpha}, base, [a, b, c])
    lam = 1 + r * min(2.0, alpha)
    expected_plus = expected.clone()
    expected_plus[0], expected_plus[1] = 0.5 * lam, 0.4 * lam
    torch.testing.assert_close(got.tensor, expected_plus, rtol=0, atol=1e-15)
    assert got.coefficients == pytest.approx([lam, lam, 1 + r * alpha])


def test_sce_unit():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, dtype=torch.float64, generator=g)
    fts = [base + s * torch.randn(40, dtype=torch.float64, generator=g) for s in (0.1, 0.2, 0.3)]
    taus = torch.stack([f - base for f in fts])
    var = taus.var(dim=0, unbiased=False)
    keep = torch.zeros(40, dtype=torch.float64)
    keep[var.argsort(descending=True)[:int(40 * 0.5)]] = 1  # no ties with random values
    sel = taus * keep
    w = (sel ** 2).mean(dim=1)
    w = w / w.sum()
    majority = torch.where(sel.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (sel.sign() == majority).double() * w[:, None]
    expected = base + (sel * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1e-6)
    got = _job("sce", {"select_topk": 0.5}, base, fts)
    torch.testing.assert_close(got.tensor, expected, rtol=0, atol=1e-14)
    assert got.coefficients == pytest.approx(w.tolist(), rel=1e-12)
    # dropped entries (and any with no agreeing weight) stay at the base
    assert torch.equal(got.tensor[keep == 0], base[keep == 0])
