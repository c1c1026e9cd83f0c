"""Every merge method against an independent float64 computation of its formula, written here.

The references below read the stored tensors with ``safetensors`` and compute in float64; they call
nothing of the engine except ``metamerge.sparsify.seed_for`` (to know which seed MetaGPT + DARE
gives each (model, tensor); the masks themselves are drawn here). Tolerances: float32 outputs
within 1e-6 of the tensor's magnitudes; bfloat16 (and float16) outputs within one ulp of the
float64 result rounded to that dtype.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from metamerge.sparsify import seed_for

from models import layer_of, load_state, run_merge

FAMILIES = ["tiny_llama_fp32", "tiny_llama_bf16", "tiny_gpt2_tied", "tiny_llama_tied_head"]
MANTISSA = {torch.bfloat16: 8, torch.float16: 11}


# ------------------------------------------------------------------------------ helpers


def family_states(fam):
    return load_state(fam.base), [load_state(p) for p in fam.finetunes]


def counted_names(fam, base_state):
    """Tensor names that count in whole-model norms: a stored lm_head tied to the embedding is
    the same parameter and counts once."""
    names = sorted(base_state)
    if fam.tied and "lm_head.weight" in base_state:
        names.remove("lm_head.weight")
    return names


def merge_and_load(recipe, out, **options):
    result = run_merge(recipe, out, **options)
    report = json.loads((out / "merge_report.json").read_text())
    return load_state(out), report, result


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at the magnitude of ``x`` (float64)."""
    x = x.double()
    _, e = torch.frexp(x)
    return torch.where(x == 0, 0.0, torch.pow(2.0, (e - MANTISSA[dtype]).double()))


def assert_merged(out: torch.Tensor, ref: torch.Tensor, *, name: str, scale: float, dtype=None):
    """``out`` (as written) against the float64 reference ``ref``."""
    dtype = dtype or out.dtype
    assert out.dtype == dtype, f"{name}: written as {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, name
    slack = 1e-6 * max(scale, ref.abs().max().item())
    if dtype == torch.float32:
        err = (out.double() - ref).abs().max().item()
        assert err <= slack, f"{name}: max |diff| {err:.3g} > {slack:.3g}"
    elif dtype == torch.float64:
        err = (out - ref).abs().max().item()
        assert err <= 1e-12 * max(scale, 1.0), f"{name}: max |diff| {err:.3g}"
    else:
        expected = ref.to(dtype).double()
        tol = ulp(torch.maximum(expected.abs(), ref.abs()), dtype) + slack
        bad = (out.double() - expected).abs() > tol
        assert not bad.any(), f"{name}: {int(bad.sum())} elements more than 1 ulp from the rounded reference"


def magnitudes(*tensors) -> float:
    return max(t.abs().max().item() for t in tensors)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the k = max(1, floor(density * n)) entries of largest magnitude."""
    if density >= 1:
        return tau
    flat = tau.abs().reshape(-1)
    k = max(1, int(density * flat.numel()))
    ordered = flat.sort(descending=True).values
    if k < flat.numel() and ordered[k - 1] > 0:
        assert ordered[k - 1] > ordered[k], "tie at the top-k boundary: the reference would be ambiguous"
    keep = torch.zeros_like(flat)
    keep[flat.topk(k).indices] = 1
    return tau * keep.view_as(tau)


def l1_rescale(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def bernoulli_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    return torch.bernoulli(torch.full(shape, density, dtype=torch.float32), generator=generator).double()


def sign_election(weighted: list[torch.Tensor], weights: list[float]):
    """TIES: elect the sign of the summed weighted mass (0 elects +), keep the agreeing entries,
    return (sum of agreeing weighted deltas, sum of agreeing weights with 0 -> 1)."""
    mass = sum(weighted)
    majority = torch.where(mass >= 0, 1.0, -1.0).double()
    masks = [(torch.sign(wd) == majority).double() for wd in weighted]
    mixed = sum(wd * m for wd, m in zip(weighted, masks))
    divisor = sum(w * m for w, m in zip(weights, masks))
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed, divisor


def check_report_norms(report, labels, base_state, ft_states, names, deltas=None):
    """Per-tensor norms and cosines, and the whole-model cosine matrix, against float64."""
    gram = torch.zeros(len(labels), len(labels), dtype=torch.float64)
    for name in names:
        taus = [(s[name].double() - base_state[name].double()).reshape(-1) for s in ft_states]
        g = torch.stack(taus) @ torch.stack(taus).T
        gram += g
        entry = report["tensors"][name]
        for i in range(len(labels)):
            assert entry["norms"][i] == pytest.approx(math.sqrt(g[i, i]), rel=1e-5, abs=1e-9)
            for j in range(len(labels)):
                if g[i, i] > 0 and g[j, j] > 0:
                    cos = g[i, j] / math.sqrt(g[i, i] * g[j, j])
                    assert entry["cosine"][i][j] == pytest.approx(float(cos), abs=1e-5)
                else:
                    assert entry["cosine"][i][j] is None
    model = report["model"]
    for i, lab in enumerate(labels):
        assert model["sqnorms"][lab] == pytest.approx(float(gram[i, i]), rel=1e-5)
        for j in range(len(labels)):
            cos = gram[i, j] / math.sqrt(gram[i, i] * gram[j, j])
            assert model["cosine"][i][j] == pytest.approx(float(cos), abs=1e-5)
    return gram


def metagpt_recipe(fam, **params):
    return {"merge_method": "metagpt", "base_model": str(fam.base),
            "models": [{"model": r} for r in fam.refs], "parameters": params}


# ------------------------------------------------------------------------------ MetaGPT


@pytest.mark.parametrize("family", FAMILIES)
def test_metagpt_model_granularity(family, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    out, report, _ = merge_and_load(metagpt_recipe(fam), tmp_path / "out")
    names = counted_names(fam, base)
    sq = [sum(float(((s[n].double() - base[n].double()) ** 2).sum()) for n in names) for s in fts]
    lambdas = [x / sum(sq) for x in sq]
    assert sorted(out) == sorted(base)
    for name in base:
        b = base[name].double()
        ref = b + sum(lam * (s[name].double() - b) for lam, s in zip(lambdas, fts))
        assert_merged(out[name], ref, name=name, scale=magnitudes(b, *(s[name] for s in fts)),
                      dtype=fam.dtype)
    for name in fam.unchanged:  # no fine-tune changed it: the base, bit for bit
        assert torch.equal(out[name], base[name]), name
    # the report: lambdas sum to one and are ||tau_t||^2 / sum_k ||tau_k||^2 over unique tensors
    assert sorted(report["model"]["lambdas"]) == sorted(fam.refs)
    got = [report["model"]["lambdas"][r] for r in fam.refs]
    assert sum(got) == pytest.approx(1.0, abs=1e-12)
    assert got == pytest.approx(lambdas, rel=1e-6)
    assert len(set(round(v, 6) for v in got)) == len(fts)  # they really differ
    assert report["granularity"] == "model"
    for name in names:
        assert report["tensors"][name]["coefficients"] == pytest.approx(got, rel=1e-12)
    check_report_norms(report, fam.refs, base, fts, names)


def test_metagpt_tied_head_counts_once(tiny_llama_tied_head, tmp_path):
    fam = tiny_llama_tied_head
    base, fts = family_states(fam)
    assert torch.equal(base["lm_head.weight"], base["model.embed_tokens.weight"])
    out, report, _ = merge_and_load(metagpt_recipe(fam), tmp_path / "out")
    # merged once and written twice, identical
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert report["tensors"]["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    emb = "model.embed_tokens.weight"
    sq_once = [sum(float(((s[n].double() - base[n].double()) ** 2).sum()) for n in base if n != "lm_head.weight")
               for s in fts]
    sq_twice = [x + float(((s[emb].double() - base[emb].double()) ** 2).sum()) for x, s in zip(sq_once, fts)]
    for i, lab in enumerate(fam.refs):
        assert report["model"]["sqnorms"][lab] == pytest.approx(sq_once[i], rel=1e-5)
        assert report["model"]["lambdas"][lab] == pytest.approx(sq_once[i] / sum(sq_once), rel=1e-6)
        # and counting the head again would have given a measurably different lambda
        assert abs(sq_twice[i] / sum(sq_twice) - sq_once[i] / sum(sq_once)) > 1e-4


@pytest.mark.parametrize("family", ["tiny_llama_fp32", "tiny_llama_bf16", "tiny_gpt2_tied"])
def test_metagpt_tensor_granularity(family, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    out, report, _ = merge_and_load(metagpt_recipe(fam, granularity="tensor"), tmp_path / "out")
    assert report["granularity"] == "tensor"
    assert "lambdas" not in report["model"]
    for name in base:
        b = base[name].double()
        taus = [s[name].double() - b for s in fts]
        sq = [float((t ** 2).sum()) for t in taus]
        coeffs = report["tensors"][name]["coefficients"]
        if sum(sq) == 0:
            assert coeffs == [0.0] * len(fts)
            assert torch.equal(out[name], base[name]), name
            continue
        lambdas = [x / sum(sq) for x in sq]
        assert sum(coeffs) == pytest.approx(1.0, abs=1e-12)
        assert coeffs == pytest.approx(lambdas, rel=1e-6, abs=1e-12)
        ref = b + sum(lam * t for lam, t in zip(lambdas, taus))
        assert_merged(out[name], ref, name=name, scale=magnitudes(b, *(s[name] for s in fts)), dtype=fam.dtype)
    assert fam.unchanged and fam.partial
    for name in fam.partial:  # fine-tune 0 left it: lambda 0 there, the others share 1
        coeffs = report["tensors"][name]["coefficients"]
        assert coeffs[0] == 0.0 and sum(coeffs[1:]) == pytest.approx(1.0, abs=1e-12)


def test_metagpt_granularity_by_filter(tiny_llama_fp32, tmp_path):
    """granularity as a filter list: per-tensor lambdas on the MLP, whole-model lambdas elsewhere."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    recipe = metagpt_recipe(fam, granularity=[{"filter": "mlp", "value": "tensor"}, {"value": "model"}])
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    taus = {n: [s[n].double() - base[n].double() for s in fts] for n in base}
    model_sq = [sum(float((taus[n][i] ** 2).sum()) for n in base) for i in range(len(fts))]
    for name in base:
        sq = [float((t ** 2).sum()) for t in taus[name]] if "mlp" in name else model_sq
        lambdas = [x / sum(sq) for x in sq]
        assert report["tensors"][name]["coefficients"] == pytest.approx(lambdas, rel=1e-6, abs=1e-12)
        ref = base[name].double() + sum(lam * t for lam, t in zip(lambdas, taus[name]))
        assert_merged(out[name], ref, name=name, scale=magnitudes(base[name], *(s[name] for s in fts)))
    assert [report["model"]["lambdas"][r] for r in fam.refs] == pytest.approx([x / sum(model_sq) for x in model_sq])


def test_metagpt_nothing_changed_is_the_base(tiny_llama_bf16, tmp_path):
    """Fine-tunes identical to the base: every lambda is 0 and the output is the base, bit for bit."""
    fam = tiny_llama_bf16
    recipe = metagpt_recipe(fam)
    recipe["models"] = [{"model": str(fam.base) + "/."}]  # the same files under another reference
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    base = load_state(fam.base)
    assert sorted(out) == sorted(base)
    for name in base:
        assert torch.equal(out[name], base[name]) and out[name].dtype == base[name].dtype, name
    assert list(report["model"]["lambdas"].values()) == [0.0]


def sparsified_metagpt_lambdas(deltas: dict[str, list[torch.Tensor]], granularity: str):
    """The expected MetaGPT lambdas of sparsified task vectors ``deltas[name][model]``: per tensor,
    ``None`` where no fine-tune changed it; plus the whole-model squared norms."""
    n_models = len(next(iter(deltas.values())))
    model_sq = [sum(float((d[i] ** 2).sum()) for d in deltas.values()) for i in range(n_models)]
    lambdas = {}
    for name, ds in deltas.items():
        sq = model_sq if granularity == "model" else [float((d ** 2).sum()) for d in ds]
        lambdas[name] = None if sum(sq) == 0 else [x / sum(sq) for x in sq]
    return lambdas, model_sq


def dare_deltas(fam, base, fts, name, *, density, seed, rescale):
    """MetaGPT + DARE: each (model, tensor) draws from its own CPU generator."""
    b = base[name].double()
    out = []
    for ref, s, d in zip(fam.refs, fts, density):
        tau = s[name].double() - b
        if d < 1:
            gen = torch.Generator().manual_seed(seed_for(seed, ref, name))
            tau = tau * bernoulli_mask(tau.shape, d, gen)
            if rescale:
                tau = tau / d
        out.append(tau)
    return out


@pytest.mark.parametrize("granularity", ["model", "tensor"])
@pytest.mark.parametrize("family,rescale", [("tiny_llama_fp32", True), ("tiny_llama_bf16", True),
                                            ("tiny_llama_fp32", False)])
def test_metagpt_dare(family, rescale, granularity, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    density = [0.6, 0.8, 0.5][: len(fts)]
    recipe = metagpt_recipe(fam, granularity=granularity, sparsify="dare", seed=7, rescale=rescale)
    for entry, d in zip(recipe["models"], density):
        entry["parameters"] = {"density": d}
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    deltas = {n: dare_deltas(fam, base, fts, n, density=density, seed=7, rescale=rescale) for n in base}
    expected, model_sq = sparsified_metagpt_lambdas(deltas, granularity)
    for name in base:
        b = base[name].double()
        if (lambdas := expected[name]) is None:
            assert torch.equal(out[name], base[name])
            continue
        assert report["tensors"][name]["coefficients"] == pytest.approx(lambdas, rel=1e-6, abs=1e-12)
        ref = b + sum(lam * d for lam, d in zip(lambdas, deltas[name]))
        assert_merged(out[name], ref, name=name,
                      scale=magnitudes(b, *(s[name] for s in fts), *deltas[name]), dtype=fam.dtype)
    if granularity == "model":
        assert [report["model"]["lambdas"][r] for r in fam.refs] == pytest.approx(
            [x / sum(model_sq) for x in model_sq], rel=1e-6)
    # the masks really dropped entries: the merge differs from plain MetaGPT
    plain, _, _ = merge_and_load(metagpt_recipe(fam, granularity=granularity), tmp_path / "plain")
    assert not torch.equal(plain["model.layers.0.self_attn.q_proj.weight"],
                           out["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_metagpt_ties(granularity, tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    density = [0.5, 0.7, 0.3]
    recipe = metagpt_recipe(fam, granularity=granularity, sparsify="ties")
    for entry, d in zip(recipe["models"], density):
        entry["parameters"] = {"density": d}
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    deltas = {n: [trim(s[n].double() - base[n].double(), d) for s, d in zip(fts, density)] for n in base}
    expected, _ = sparsified_metagpt_lambdas(deltas, granularity)
    for name in base:
        b = base[name].double()
        if (lambdas := expected[name]) is None:
            assert torch.equal(out[name], base[name])
            continue
        assert report["tensors"][name]["coefficients"] == pytest.approx(lambdas, rel=1e-6, abs=1e-12)
        mixed, divisor = sign_election([lam * d for lam, d in zip(lambdas, deltas[name])], lambdas)
        ref = b + mixed / divisor
        assert_merged(out[name], ref, name=name, scale=magnitudes(b, *(s[name] for s in fts)))
    for name in fam.unchanged:
        assert torch.equal(out[name], base[name])


# ------------------------------------------------------------------------------ task arithmetic family


def gta_reference(base, fts, names, *, weights, density, lam=1.0, normalize=False, sparsify=None,
                  consensus=False, rescale=False, seed=0):
    """mergekit's generalized task arithmetic in float64; ``weights``/``density`` are functions
    (model index, tensor name) -> value. DARE draws one CPU stream in sorted tensor order."""
    gen = torch.Generator().manual_seed(seed)
    refs = {}
    for name in sorted(names):
        b = base[name].double()
        w = [weights(i, name) for i in range(len(fts))]
        deltas = []
        for i, s in enumerate(fts):
            tau = s[name].double() - b
            d = density(i, name)
            if sparsify == "magnitude" and d < 1:
                kept = trim(tau, d)
                tau = l1_rescale(tau, kept) if rescale else kept
            elif sparsify == "random" and d < 1:
                kept = tau * bernoulli_mask(tau.shape, d, gen)
                tau = l1_rescale(tau, kept) if rescale else kept
            deltas.append(tau)
        weighted = [wi * di for wi, di in zip(w, deltas)]
        if consensus:
            mixed, divisor = sign_election(weighted, w)
        else:
            mixed = sum(weighted)
            divisor = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
        if normalize:
            mixed = mixed / divisor
        refs[name] = b + lam * mixed
    return refs


def gta_recipe(fam, method, per_model: list[dict], **params):
    return {"merge_method": method, "base_model": str(fam.base),
            "models": [{"model": r, "parameters": p} for r, p in zip(fam.refs, per_model)],
            "parameters": params}


def check_all(out, refs, base, fts, dtype, *, exact_unchanged=()):
    assert sorted(out) == sorted(refs)
    for name, ref in refs.items():
        assert_merged(out[name], ref, name=name, scale=magnitudes(base[name], *(s[name] for s in fts)), dtype=dtype)
    for name in exact_unchanged:
        assert torch.equal(out[name], base[name]), name


@pytest.mark.parametrize("family", ["tiny_llama_fp32", "tiny_llama_bf16", "tiny_gpt2_tied"])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(family, normalize, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    ws = [1.0, 0.5, 0.25][: len(fts)]
    recipe = gta_recipe(fam, "task_arithmetic", [{"weight": w} for w in ws], **{"lambda": 0.7, "normalize": normalize})
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    refs = gta_reference(base, fts, base, weights=lambda i, n: ws[i], density=lambda i, n: 1.0, lam=0.7,
                         normalize=normalize)
    check_all(out, refs, base, fts, fam.dtype, exact_unchanged=fam.unchanged)
    coeffs = [0.7 * w / (sum(ws) if normalize else 1) for w in ws]
    assert report["tensors"][sorted(base)[0]]["coefficients"] == pytest.approx(coeffs, rel=1e-12)


@pytest.mark.parametrize("family", ["tiny_llama_fp32", "tiny_gpt2_tied"])
@pytest.mark.parametrize("extra", [{}, {"normalize": False}, {"rescale": True, "lambda": 0.8}])
def test_ties(family, extra, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    ws, ds = [0.6, 0.4, 0.9][: len(fts)], [0.5, 0.7, 0.2][: len(fts)]
    recipe = gta_recipe(fam, "ties", [{"weight": w, "density": d} for w, d in zip(ws, ds)], **extra)
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    refs = gta_reference(base, fts, base, weights=lambda i, n: ws[i], density=lambda i, n: ds[i],
                         sparsify="magnitude", consensus=True, normalize=extra.get("normalize", True),
                         rescale=extra.get("rescale", False), lam=extra.get("lambda", 1.0))
    check_all(out, refs, base, fts, fam.dtype, exact_unchanged=fam.unchanged)
    # trimming changed the result: it is not the untrimmed, unelected weighted sum
    plain = gta_reference(base, fts, base, weights=lambda i, n: ws[i], density=lambda i, n: 1.0)
    name = sorted(n for n in base if n not in fam.unchanged)[0]
    assert (out[name].double() - plain[name]).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("family,extra", [("tiny_llama_fp32", {}), ("tiny_llama_bf16", {}),
                                          ("tiny_llama_fp32", {"rescale": False, "normalize": True})])
def test_dare(method, family, extra, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    ws, ds = [0.7, 0.5, 0.3][: len(fts)], [0.5, 1.0, 0.3][: len(fts)]  # density 1 draws nothing
    recipe = gta_recipe(fam, method, [{"weight": w, "density": d} for w, d in zip(ws, ds)], seed=11, **extra)
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    refs = gta_reference(base, fts, base, weights=lambda i, n: ws[i], density=lambda i, n: ds[i], seed=11,
                         sparsify="random", consensus=method == "dare_ties",
                         rescale=extra.get("rescale", True), normalize=extra.get("normalize", False))
    check_all(out, refs, base, fts, fam.dtype, exact_unchanged=fam.unchanged)


@pytest.mark.parametrize("family", ["tiny_llama_fp32", "tiny_llama_bf16"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(family, normalize, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    ws = [0.5, 0.3, 0.4][: len(fts)]
    recipe = {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": w}}
                                                   for r, w in zip(fam.refs, ws)],
              "parameters": {"normalize": normalize}}
    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    assert sorted(out) == sorted(base)
    total = sum(ws) if normalize else 1.0
    for name in base:
        ref = sum(w * s[name].double() for w, s in zip(ws, fts)) / total
        assert_merged(out[name], ref, name=name, scale=magnitudes(*(s[name] for s in fts)), dtype=fam.dtype)
    assert report["base"] is None
    assert report["tensors"][sorted(base)[0]]["coefficients"] == pytest.approx([w / total for w in ws])


def test_linear_appends_an_unlisted_base(tiny_llama_fp32, tmp_path):
    """As mergekit: a base_model not listed under models is one more averaged input."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    recipe = {"merge_method": "linear", "base_model": str(fam.base),
              "models": [{"model": fam.refs[0], "parameters": {"weight": 3.0}}],
              "parameters": {"weight": 1.0}}
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    for name in base:
        ref = (3.0 * fts[0][name].double() + base[name].double()) / 4.0
        assert_merged(out[name], ref, name=name, scale=magnitudes(base[name], fts[0][name]))


# ------------------------------------------------------------------------------ parameter forms


def t_of(name: str, num_layers: int) -> float:
    layer = layer_of(name)
    return 0.0 if layer is None else layer / (num_layers - 1)


def test_per_model_parameter_overrides_global(tiny_llama_fp32, tmp_path):
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    recipe = gta_recipe(fam, "task_arithmetic", [{}, {"weight": 0.8}, {}], weight=0.5)
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    ws = [0.5, 0.8, 0.5]
    refs = gta_reference(base, fts, base, weights=lambda i, n: ws[i], density=lambda i, n: 1.0)
    check_all(out, refs, base, fts, fam.dtype)


def test_filter_lists(tiny_llama_fp32, tmp_path):
    """[{filter, value}, ...]: the first filter that is a substring of the name wins; a list where
    nothing matches falls through to the global setting."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    per_model = [
        {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]},
        {"weight": [{"filter": "mlp", "value": 0.25}]},             # falls through elsewhere
        {"weight": [{"filter": "q_proj", "value": 2.0}, {"filter": "self_attn", "value": 0.1}, {"value": 0.3}]},
    ]
    recipe = gta_recipe(fam, "task_arithmetic", per_model, weight=0.9)

    def weight(i, n):
        if i == 0:
            return 0.5 if "self_attn" in n else 1.0
        if i == 1:
            return 0.25 if "mlp" in n else 0.9
        return 2.0 if "q_proj" in n else 0.1 if "self_attn" in n else 0.3

    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    refs = gta_reference(base, fts, base, weights=weight, density=lambda i, n: 1.0)
    check_all(out, refs, base, fts, fam.dtype)


def test_gradient_lists(tiny_llama_fp32, tmp_path):
    """[a, b, ...] is interpolated over layers: layer i of N at t = i/(N-1), others at t = 0."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    per_model = [{"weight": [0.0, 1.0]}, {"weight": [1.0, 0.2, 0.6]}, {"weight": 0.5}]
    recipe = gta_recipe(fam, "task_arithmetic", per_model)

    def interp(values, t):
        x = t * (len(values) - 1)
        i0 = int(math.floor(x))
        i1 = min(i0 + 1, len(values) - 1)
        return (1 - (x - i0)) * values[i0] + (x - i0) * values[i1]

    def weight(i, n):
        t = t_of(n, fam.num_layers)
        return [interp([0.0, 1.0], t), interp([1.0, 0.2, 0.6], t), 0.5][i]

    out, report, _ = merge_and_load(recipe, tmp_path / "out")
    refs = gta_reference(base, fts, base, weights=weight, density=lambda i, n: 1.0)
    check_all(out, refs, base, fts, fam.dtype)
    # the coefficients really vary: layer 0 gives [0, 1, .5], layer 1 gives [1, .6, .5], embed t = 0
    assert report["tensors"]["model.layers.0.mlp.up_proj.weight"]["coefficients"] == pytest.approx([0.0, 1.0, 0.5])
    assert report["tensors"]["model.layers.1.mlp.up_proj.weight"]["coefficients"] == pytest.approx([1.0, 0.6, 0.5])
    assert report["tensors"]["model.embed_tokens.weight"]["coefficients"] == pytest.approx([0.0, 1.0, 0.5])
    assert report["tensors"]["lm_head.weight"]["coefficients"] == pytest.approx([0.0, 1.0, 0.5])


def test_gradient_density_with_metagpt_dare(tiny_llama_fp32, tmp_path):
    """A gradient on MetaGPT's per-model density: layer 0 keeps 0.5, layer 1 keeps everything."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    recipe = metagpt_recipe(fam, sparsify="dare", seed=3, granularity="tensor", density=[0.5, 1.0])
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    for name in base:
        d = 0.5 + 0.5 * t_of(name, fam.num_layers)
        deltas = dare_deltas(fam, base, fts, name, density=[d] * 3, seed=3, rescale=True)
        sq = [float((x ** 2).sum()) for x in deltas]
        if sum(sq) == 0:
            continue
        ref = base[name].double() + sum(s / sum(sq) * x for s, x in zip(sq, deltas))
        assert_merged(out[name], ref, name=name, scale=magnitudes(base[name], *deltas))


# ------------------------------------------------------------------------------ dtypes


def read_config(out):
    return json.loads((out / "config.json").read_text())


def test_dtype_casts_inputs_first(tiny_llama_fp32, tmp_path):
    """dtype: bfloat16 rounds every input to bf16 before the math, and is the output dtype."""
    fam = tiny_llama_fp32
    base, fts = family_states(fam)
    recipe = gta_recipe(fam, "task_arithmetic", [{"weight": 0.5}] * 3)
    recipe["dtype"] = "bfloat16"
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    rb = {n: t.to(torch.bfloat16) for n, t in base.items()}
    rf = [{n: t.to(torch.bfloat16) for n, t in s.items()} for s in fts]
    refs = gta_reference(rb, rf, base, weights=lambda i, n: 0.5, density=lambda i, n: 1.0)
    check_all(out, refs, rb, rf, torch.bfloat16)
    assert read_config(tmp_path / "out")["dtype"] == "bfloat16"


@pytest.mark.parametrize("family,keys,want", [
    ("tiny_llama_fp32", {"out_dtype": "float16"}, torch.float16),
    ("tiny_llama_bf16", {"out_dtype": "float32"}, torch.float32),
    ("tiny_llama_bf16", {"dtype": "float32", "out_dtype": "bfloat16"}, torch.bfloat16),
    ("tiny_llama_fp32", {"dtype": "float64"}, torch.float64),
])
def test_out_dtype(family, keys, want, request, tmp_path):
    fam = request.getfixturevalue(family)
    base, fts = family_states(fam)
    recipe = metagpt_recipe(fam)
    recipe.update(keys)
    out, _, _ = merge_and_load(recipe, tmp_path / "out")
    names = sorted(base)
    sq = [sum(float(((s[n].double() - base[n].double()) ** 2).sum()) for n in names) for s in fts]
    for name in names:
        b = base[name].double()
        ref = b + sum(x / sum(sq) * (s[name].double() - b) for x, s in zip(sq, fts))
        assert_merged(out[name], ref, name=name, scale=magnitudes(b, *(s[name] for s in fts)), dtype=want)
    cfg = read_config(tmp_path / "out")
    assert cfg["dtype"] == str(want).removeprefix("torch.")
    assert "torch_dtype" not in cfg


def test_no_dtype_keeps_base_dtype_and_config(tiny_llama_bf16, tmp_path):
    fam = tiny_llama_bf16
    out, _, _ = merge_and_load(metagpt_recipe(fam), tmp_path / "out")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    base_cfg = json.loads((fam.base / "config.json").read_text())
    assert read_config(tmp_path / "out") == base_cfg
