"""metamerge.sparsify on plain tensors; every expectation is worked out by hand or in float64."""

from __future__ import annotations

import pytest
import torch

from metamerge import sparsify as sp

# Distinct magnitudes, so "the k largest" is unambiguous.
TAU = [0.5, -3.0, 2.0, -0.1, 1.0, -4.0, 0.25, 2.5]


def _top_k_by_hand(values: list[float], k: int) -> list[float]:
    keep = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k]
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


# ------------------------------------------------------------------------------ magnitude


def test_magnitude_keeps_the_largest_half():
    out = sp.magnitude(torch.tensor(TAU), 0.5)
    assert out.tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, -4.0, 0.0, 2.5]


@pytest.mark.parametrize("density, k", [
    (0.01, 1),   # int(0.08) == 0, but at least one entry is kept
    (0.3, 2),    # int(2.4) == 2: truncation, not rounding
    (0.5, 4),
    (0.99, 7),   # int(7.92) == 7: the smallest entry (-0.1) goes
])
def test_magnitude_keeps_max_1_int_density_n(density, k):
    out = sp.magnitude(torch.tensor(TAU, dtype=torch.float64), density)
    assert int((out != 0).sum()) == k
    assert out.tolist() == _top_k_by_hand(TAU, k)


def test_magnitude_keeps_shape_and_positions_of_a_matrix():
    tau = torch.tensor([[1.0, -9.0, 3.0], [8.0, 0.5, -2.0]])
    out = sp.magnitude(tau, 0.34)  # k = int(2.04) = 2
    assert out.shape == (2, 3)
    assert out.tolist() == [[0.0, -9.0, 0.0], [8.0, 0.0, 0.0]]


@pytest.mark.parametrize("density", [1.0, 1.5])
def test_magnitude_density_one_or_more_is_identity(density):
    tau = torch.tensor(TAU)
    assert torch.equal(sp.magnitude(tau, density), tau)


@pytest.mark.parametrize("density", [0.0, -0.5])
def test_magnitude_density_zero_or_less_is_zeros(density):
    tau = torch.tensor(TAU, dtype=torch.bfloat16).reshape(2, 4)
    out = sp.magnitude(tau, density)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4)
    assert not out.any()


def test_magnitude_of_empty_tensor_is_empty():
    out = sp.magnitude(torch.zeros(0, 3), 0.5)
    assert out.shape == (0, 3)


def test_magnitude_rescale_preserves_l1_norm():
    tau = torch.tensor(TAU, dtype=torch.float64)
    out = sp.magnitude(tau, 0.5, rescale=True)
    l1 = sum(abs(v) for v in TAU)          # 13.35
    kept_l1 = 4.0 + 3.0 + 2.5 + 2.0        # 11.5
    factor = l1 / kept_l1
    expected = [v * factor for v in [0.0, -3.0, 2.0, 0.0, 0.0, -4.0, 0.0, 2.5]]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(out.abs().sum()) == pytest.approx(l1, rel=1e-12)


def test_magnitude_keeps_dtype_and_leaves_input_alone():
    tau = torch.tensor(TAU, dtype=torch.float16)
    before = tau.clone()
    out = sp.magnitude(tau, 0.5, rescale=True)
    assert out.dtype == torch.float16
    assert torch.equal(tau, before)


# ------------------------------------------------------------------------------ rescale_l1


def test_rescale_l1_scales_kept_to_the_original_l1():
    tau = torch.tensor([1.0, 2.0, -1.0])
    kept = torch.tensor([1.0, 0.0, -1.0])
    assert sp.rescale_l1(tau, kept).tolist() == [2.0, 0.0, -2.0]  # 4 / 2


def test_rescale_l1_tiny_original_norm_leaves_kept_as_is():
    tau = torch.full((4,), 1e-9)
    kept = torch.tensor([1e-9, 0.0, 0.0, 0.0])
    assert torch.equal(sp.rescale_l1(tau, kept), kept)
    # Below 1e-7 the original norm is not trusted, even when the kept one is larger.
    tau = torch.full((4,), 1e-8, dtype=torch.float64)
    kept = tau * 4  # L1 1.6e-7
    assert torch.equal(sp.rescale_l1(tau, kept), kept)


def test_rescale_l1_just_above_the_guard_rescales():
    tau = torch.full((2,), 1e-7, dtype=torch.float64)    # L1 2e-7
    kept = torch.tensor([1e-7, 0.0], dtype=torch.float64)  # L1 1e-7, not below the guard
    assert sp.rescale_l1(tau, kept).tolist() == pytest.approx([2e-7, 0.0], rel=1e-12)


def test_rescale_l1_nothing_kept_gives_zeros_not_nan():
    tau = torch.tensor([1.0, -2.0])
    out = sp.rescale_l1(tau, torch.zeros(2))
    assert out.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------ dare


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("density", [1.0, 2.0])
def test_dare_density_one_is_identity_and_draws_nothing(density):
    tau = torch.arange(1.0, 11.0)
    g = _gen(7)
    state = g.get_state().clone()
    out = sp.dare(tau, density, g)
    assert torch.equal(out, tau)
    assert torch.equal(g.get_state(), state)


def test_dare_below_one_advances_the_generator():
    g = _gen(7)
    state = g.get_state().clone()
    sp.dare(torch.ones(10), 0.5, g)
    assert not torch.equal(g.get_state(), state)


def test_dare_same_seed_same_mask_other_seed_other_mask():
    tau = torch.arange(1.0, 1001.0)
    a = sp.dare(tau, 0.5, _gen(123))
    b = sp.dare(tau, 0.5, _gen(123))
    c = sp.dare(tau, 0.5, _gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)


def test_dare_inverse_rescale_divides_survivors_by_density():
    tau = torch.arange(1.0, 1001.0, dtype=torch.float64)  # no zeros: a zero output means dropped
    density = 0.3
    out = sp.dare(tau, density, _gen(0), rescale="inverse")
    kept = out != 0
    assert 0 < int(kept.sum()) < tau.numel()
    assert torch.allclose(out[kept], tau[kept] / density, rtol=1e-15, atol=0)
    assert not out[~kept].any()


def test_dare_no_rescale_keeps_survivors_unchanged():
    tau = torch.arange(1.0, 1001.0)
    out = sp.dare(tau, 0.4, _gen(1), rescale=None)
    kept = out != 0
    assert 0 < int(kept.sum()) < tau.numel()
    assert torch.equal(out[kept], tau[kept])


def test_dare_mask_does_not_depend_on_rescale_mode():
    tau = torch.arange(1.0, 1001.0)
    masks = [sp.dare(tau, 0.6, _gen(5), rescale=r) != 0 for r in ("inverse", "l1", None)]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_dare_l1_rescale_keeps_l1_norm():
    tau = torch.randn(5000, generator=_gen(3), dtype=torch.float64)
    out = sp.dare(tau, 0.2, _gen(4), rescale="l1")
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-12)
    kept = out != 0
    ratio = out[kept] / tau[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)  # one common factor


def test_dare_keeps_about_density_of_a_large_tensor():
    n, density = 200_000, 0.3
    out = sp.dare(torch.ones(n), density, _gen(11), rescale=None)
    frac = float((out != 0).sum()) / n
    assert abs(frac - density) < 0.005  # ~5 standard deviations (sqrt(.21/n) ~ 0.001)


def test_dare_keeps_dtype_shape_and_input():
    tau = torch.ones(4, 5, dtype=torch.bfloat16)
    before = tau.clone()
    out = sp.dare(tau, 0.5, _gen(2))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 5)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(tau, before)


# ------------------------------------------------------------------------------ seed_for


def test_seed_for_is_deterministic_and_63_bit():
    s = sp.seed_for(0, "model-a", "model.layers.0.mlp.up_proj.weight")
    assert s == sp.seed_for(0, "model-a", "model.layers.0.mlp.up_proj.weight")
    assert isinstance(s, int) and 0 <= s < 2**63
    torch.Generator().manual_seed(s)  # usable as a torch seed


def test_seed_for_changes_with_each_input():
    ref = sp.seed_for(0, "a", "w")
    assert sp.seed_for(1, "a", "w") != ref
    assert sp.seed_for(0, "b", "w") != ref
    assert sp.seed_for(0, "a", "v") != ref


def test_seed_for_separates_model_from_tensor_name():
    assert sp.seed_for(0, "ab", "c") != sp.seed_for(0, "a", "bc")
    assert sp.seed_for(1, "2", "x") != sp.seed_for(12, "", "x")


def test_seed_for_spreads_over_the_range():
    seeds = {sp.seed_for(0, "m", f"layers.{i}.w") for i in range(2000)}
    assert len(seeds) == 2000
    assert all(s < 2**63 for s in seeds)
    assert max(seeds) > 2**62  # the top bit of the 63 is used


# ------------------------------------------------------------------------------ sign_consensus

# Rows are models, columns entries:
#   col 0: [1, 1, -5]  sum -3 -> "-";  signs +1+1-1 = +1 -> "+"
#   col 1: [2, -2, 0]  sum 0 -> "+";   signs 0 -> "+"
#   col 2: [0, 0, 0]   zero mass -> "+", but a zero agrees with no sign
#   col 3: [-1, -2, 3] sum 0 -> "+";   signs -1 -> "-"
WEIGHTED = torch.tensor([[1.0, 2.0, 0.0, -1.0],
                         [1.0, -2.0, 0.0, -2.0],
                         [-5.0, 0.0, 0.0, 3.0]])


def test_sign_consensus_sum_elects_the_sign_of_the_mass():
    assert sp.sign_consensus(WEIGHTED, "sum").tolist() == [[0.0, 1.0, 0.0, 0.0],
                                                           [0.0, 0.0, 0.0, 0.0],
                                                           [1.0, 0.0, 0.0, 1.0]]


def test_sign_consensus_default_is_sum():
    assert torch.equal(sp.sign_consensus(WEIGHTED), sp.sign_consensus(WEIGHTED, "sum"))


def test_sign_consensus_count_elects_the_most_common_sign():
    assert sp.sign_consensus(WEIGHTED, "count").tolist() == [[1.0, 1.0, 0.0, 1.0],
                                                             [1.0, 0.0, 0.0, 1.0],
                                                             [0.0, 0.0, 0.0, 0.0]]


def test_sign_consensus_keeps_dtype():
    out = sp.sign_consensus(WEIGHTED.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_magnitude_of_a_non_contiguous_tensor():
    """A transposed view keeps the same entries as its contiguous copy would."""
    x = torch.arange(12.0).reshape(3, 4).t()
    out = sp.magnitude(x, 0.25)
    expected = torch.where(x >= 9, x, torch.zeros_like(x))
    assert torch.equal(out, expected)
