"""MetaGPT's closed-form coefficients and the squared norms they come from."""

from __future__ import annotations

import pytest
import torch

from metamerge.methods.metagpt import metagpt_lambdas, squared_norm

# ------------------------------------------------------------------------------ metagpt_lambdas


def test_lambdas_are_proportional_to_squared_norms():
    lambdas = metagpt_lambdas([1.0, 2.0, 3.0, 4.0])
    assert lambdas == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=1e-15)
    assert sum(lambdas) == pytest.approx(1.0, rel=1e-15)


def test_lambdas_of_very_unequal_norms():
    lambdas = metagpt_lambdas([1e-6, 1e6])
    assert lambdas == pytest.approx([1e-6 / (1e6 + 1e-6), 1e6 / (1e6 + 1e-6)], rel=1e-15)


def test_one_fine_tune_gets_everything():
    assert metagpt_lambdas([5.0]) == [1.0]


def test_an_unchanged_fine_tune_gets_zero():
    assert metagpt_lambdas([0.0, 3.0]) == [0.0, 1.0]


def test_all_zero_norms_give_all_zero_lambdas():
    lambdas = metagpt_lambdas([0.0, 0.0, 0.0])
    assert lambdas == [0.0, 0.0, 0.0]
    assert metagpt_lambdas([]) == []


def test_lambdas_accept_ints_and_return_floats():
    lambdas = metagpt_lambdas([1, 3])
    assert lambdas == [0.25, 0.75]
    assert all(type(x) is float for x in lambdas)


# ------------------------------------------------------------------------------ squared_norm


def _reference(t: torch.Tensor) -> float:
    return float((t.to(torch.float64) ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_squared_norm_small_tensor_matches_float64(dtype):
    t = (torch.randn(37, 11, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    assert squared_norm(t) == pytest.approx(_reference(t), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1 << 20, (1 << 20) + 1, (1 << 21) + 12345])
def test_squared_norm_across_the_chunk_boundary(dtype, n):
    # A float32 dot over a million terms is good to ~1e-5 relative (measured: up to 1.1e-5 on
    # bfloat16 input); a dropped or doubled chunk, or half-precision accumulation (off by ~1e-3,
    # or inf for float16), is far outside 1e-4.
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    assert squared_norm(t) == pytest.approx(_reference(t), rel=1e-4)


@pytest.mark.parametrize("n", [10, 4096, 4099, 3 * 4096 + 1, (1 << 20) + 5])
def test_squared_norm_counts_every_block_once(n):
    # small integers: the sum of squares is exact in float64, so a dropped or doubled block (of 4096)
    # or chunk (of 2**20) shows
    values = [i % 7 + 1 for i in range(n)]
    assert squared_norm(torch.tensor(values, dtype=torch.float32)) == sum(v * v for v in values)


def test_squared_norm_half_precision_does_not_overflow():
    # 300^2 = 90000 is past float16's largest finite value (65504).
    t = torch.full((1000,), 300.0, dtype=torch.float16)
    assert squared_norm(t) == 90000.0 * 1000


def test_squared_norm_keeps_float64_precision():
    t = torch.tensor([1.0, 1e-8], dtype=torch.float64)
    assert squared_norm(t) == 1.0 + 1e-16


def test_squared_norm_of_integers_matrices_and_views():
    assert squared_norm(torch.tensor([1, -2, 3])) == 14.0
    m = torch.arange(6.0).reshape(2, 3)
    assert squared_norm(m) == 55.0
    assert squared_norm(m.t()) == 55.0       # non-contiguous
    assert squared_norm(torch.zeros(0)) == 0.0
    assert isinstance(squared_norm(m), float)
