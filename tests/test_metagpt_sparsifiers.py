"""MetaGPT with the breadcrumbs and DELLA sparsifiers against an independent float64 computation.

The lambdas are ``||s(tau_t)||^2 / sum_k ||s(tau_k)||^2`` of the *sparsified* task vectors ``s(tau)``
and the merge is ``theta_0 + sum_t lambda_t s(tau_t)``. The masks are computed here from their
definitions; only ``metamerge.sparsify.seed_for`` is borrowed, to know which seed each (model, tensor)
of DELLA draws from (the draw itself is made here, as the DARE test does).

Which entries a mask keeps depends on the order of the magnitudes; the engine computes with the
task vector in the compute dtype (float32 here), so the masks are ordered on that float32 task
vector (and the tests assert no tie makes the order ambiguous). Everything else is float64.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_methods import (
    assert_merged,
    family_states,
    l1_rescale,
    magnitudes,
    merge_and_load,
    metagpt_recipe,
    sparsified_metagpt_lambdas,
)

from metamerge.errors import MergeError
from metamerge.methods import get_method
from metamerge.recipe import parse_recipe
from metamerge.sparsify import seed_for

from models import run_merge

Q = "model.layers.0.self_attn.q_proj.weight"


def task_vectors32(base, fts, name):
    """The task vectors as the engine sees them at float32 compute (for ordering magnitudes)."""
    return [s[name].float() - base[name].float() for s in fts]


def breadcrumbs_mask(tau32: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (mergekit's order): sort |tau| ascending, drop the top ``int(gamma n)``
    outliers and the smallest, keep ``int(density n)`` entries."""
    if density >= 1:
        return torch.ones(tau32.shape, dtype=torch.float64)
    flat = tau32.abs().reshape(-1)
    n = flat.numel()
    keep_n = int(density * n)
    bottom = max(0, n - keep_n - int(gamma * n))
    values, order = flat.sort(stable=True)
    if values[-1] > 0:  # an all-zero task vector is zero under any mask
        for edge in (bottom, bottom + keep_n):
            if 0 < edge < n:
                assert values[edge - 1] < values[edge], "tie at a breadcrumbs boundary: the reference is ambiguous"
    mask = torch.zeros(n, dtype=torch.float64)
    mask[order[bottom:bottom + keep_n]] = 1
    return mask.view(tau32.shape)


def della_probabilities(tau32: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: in each row (a 1-D tensor is one row), the entry of magnitude rank r (1 =
    smallest of n) is kept with probability ``density - epsilon + 2 epsilon (r - 1) / (n - 1)``, in
    float32 as the draw uses it."""
    rows = tau32 if tau32.dim() >= 2 else tau32.unsqueeze(0)
    mags = rows.abs()
    n = rows.shape[1]
    # rank by counting: the number of entries of the same row with a smaller magnitude, plus one
    ranks = (mags.unsqueeze(-1) > mags.unsqueeze(-2)).sum(dim=-1).to(torch.float32) + 1
    if bool((mags > 0).any()):
        srt = mags.sort(dim=1).values
        assert bool((srt[:, 1:] > srt[:, :-1]).all()), "tied magnitudes in a row: DELLA's ranks are ambiguous"
    rank_norm = (ranks - 1) / (n - 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_deltas(refs, base, fts, name, *, density, epsilon, seed, rescale):
    """MetaGPT + DELLA: each (model, tensor) draws its Bernoulli mask from its own CPU generator."""
    b = base[name].double()
    out = []
    for ref, s, tau32, d, e in zip(refs, fts, task_vectors32(base, fts, name), density, epsilon):
        tau = s[name].double() - b
        if d < 1:
            gen = torch.Generator().manual_seed(seed_for(seed, ref, name))
            keep = torch.bernoulli(della_probabilities(tau32, d, e), generator=gen).double().view(tau.shape)
            kept = tau * keep
            tau = l1_rescale(tau, kept) if rescale else kept
        out.append(tau)
    return out


def check_metagpt(out, report, base, fts, deltas, granularity, refs):
    """``out`` is theta_0 + sum_t lambda_t delta_t with the lambdas of ``deltas``; report agrees."""
    expected, model_sq = sparsified_metagpt_lambdas(deltas, granularity)
    for name in base:
        b = base[name].double()
        if (lambdas := expected[name]) is None:
            assert torch.equal(out[name], base[name]), name
            continue
        assert report["tensors"][name]["coefficients"] == pytest.approx(lambdas, rel=1e-6, abs=1e-12)
        ref = b + sum(lam * d for lam, d in zip(lambdas, deltas[name]))
        assert_merged(out[name], ref, name=name, scale=magnitudes(b, *(s[name] for s in fts), *deltas[name]))
    if granularity == "model":
        got = [report["model"]["lambdas"][r] for r in refs]
        assert got == pytest.approx([x / sum(model_sq) for x in model_sq], rel=1e-6)


def with_model_params(recipe, per_model: list[dict]):
    for entry, p in zip(recipe["models"], per_model):
        entry["parameters"] = p
    return recipe


# ------------------------------------------------------------------------------ breadcrumbs


@pytest.mark.parametrize("granularity", ["model", "tensor"])
@pytest.mark.parametrize("family", ["tiny_llama_fp32", "tiny_gpt2_tied"])
def test_metagpt_breadcrumbs(family, granularity, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    per_model = [{"density": 0.5, "gamma": 0.05}, {"density": 0.8}, {"density": 0.6, "gamma": 0.1}][: len(fts)]
    recipe = with_model_params(metagpt_recipe(fam, granularity=granularity, sparsify="breadcrumbs", gamma=0.02),
                               per_model)
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    deltas = {}
    for name in base:
        taus = [s[name].double() - base[name].double() for s in fts]
        masks = [breadcrumbs_mask(t32, p["density"], p.get("gamma", 0.02))
                 for t32, p in zip(task_vectors32(base, fts, name), per_model)]
        deltas[name] = [t * m for t, m in zip(taus, masks)]  # breadcrumbs keeps survivors as they are
    check_metagpt(out, report, base, fts, deltas, granularity, fam.refs)
    # the outliers really went: the largest entry of fine-tune 0's task vector is not in its delta
    name = min(n for n in base if n.endswith(".weight") and base[n].dim() == 2)
    tau0 = fts[0][name].double() - base[name].double()
    top = tau0.abs().argmax()
    assert deltas[name][0].reshape(-1)[top] == 0 and tau0.reshape(-1)[top] != 0
    plain, _, _ = merge_and_load(metagpt_recipe(fam, granularity=granularity), tmp_path / "plain")
    assert not torch.equal(plain[name], out[name])


# ------------------------------------------------------------------------------ DELLA


@pytest.mark.parametrize("granularity,rescale,family", [("model", True, "tiny_llama_fp32"),
                                                        ("tensor", True, "tiny_llama_fp32"),
                                                        ("model", False, "tiny_gpt2_tied")])
def test_metagpt_della(family, granularity, rescale, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    density, epsilon = [0.5, 0.7, 0.4][: len(fts)], [0.1, 0.15, 0.3][: len(fts)]
    recipe = with_model_params(metagpt_recipe(fam, granularity=granularity, sparsify="della", seed=5,
                                              rescale=rescale),
                               [{"density": d, "epsilon": e} for d, e in zip(density, epsilon)])
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    deltas = {n: della_deltas(fam.refs, base, fts, n, density=density, epsilon=epsilon, seed=5, rescale=rescale)
              for n in base}
    check_metagpt(out, report, base, fts, deltas, granularity, fam.refs)
    # the masks are random per (seed, model, tensor): another seed gives another merge
    other, _, _ = merge_and_load({**recipe, "parameters": {**recipe["parameters"], "seed": 6}}, tmp_path / "seed6")
    name = Q if fam.arch == "llama" else "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(other[name], out[name])


def test_metagpt_sparsify_by_filter(tiny_llama_fp32, tmp_path):
    """``sparsify`` as a filter list: DELLA on the MLP, breadcrumbs elsewhere, one model-wide lambda."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    recipe = metagpt_recipe(fam, sparsify=[{"filter": "mlp", "value": "della"}, {"value": "breadcrumbs"}],
                            density=0.6, epsilon=0.2, gamma=0.05, seed=3)
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    n = len(fts)
    deltas = {}
    for name in base:
        if "mlp" in name:
            deltas[name] = della_deltas(fam.refs, base, fts, name, density=[0.6] * n, epsilon=[0.2] * n, seed=3,
                                        rescale=True)
        else:
            deltas[name] = [(s[name].double() - base[name].double()) * breadcrumbs_mask(t32, 0.6, 0.05)
                            for s, t32 in zip(fts, task_vectors32(base, fts, name))]
    check_metagpt(out, report, base, fts, deltas, "model", fam.refs)
    # DELLA draws random masks on some tensors, so the per-fine-tune norm cache is keyed by the model
    method = get_method("metagpt")(parse_recipe(recipe), num_layers=fam.num_layers)
    assert method.random_sparsification()
    assert method.statistics_key(0)["seed_key"] == fam.refs[0]
    still = get_method("metagpt")(parse_recipe(metagpt_recipe(fam, sparsify=["none", "breadcrumbs"])), 2)
    assert not still.random_sparsification() and still.statistics_key(0)["seed_key"] is None


def test_metagpt_della_epsilon_out_of_range(tiny_llama_fp32, tmp_path):
    recipe = metagpt_recipe(tiny_llama_fp32, sparsify="della", density=0.9, epsilon=0.15)
    with pytest.raises(MergeError, match="epsilon 0.15 must keep density"):
        run_merge(recipe, tmp_path / "out")
