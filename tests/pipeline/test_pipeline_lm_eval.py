"""The optional lm-evaluation-harness step: validated up front, called with the merged model, keyed,
and its results carried into eval.json and the MLflow metrics.

The harness itself is not installed here (it downloads its datasets), so the package on the path is a
stand-in with the harness's entry point, ``lm_eval.simple_evaluate``: it records each call and scores
the model it is given by really loading it (parameter count), so the step is checked end to end
without the network. Without any ``lm_eval`` the params are refused before work starts.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest

from metamerge.errors import MergeError
from pipeline import keys, reports, steps
from pipeline.params import load_params

from pipeline_helpers import params_for

STAND_IN = textwrap.dedent('''
    import json, os
    CALLS = []

    def simple_evaluate(model, model_args, tasks, device, batch_size, num_fewshot, limit):
        from transformers import AutoModelForCausalLM
        args = dict(kv.split("=", 1) for kv in model_args.split(","))
        n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(args["pretrained"]).parameters())
        CALLS.append({"model": model, "args": args, "tasks": tasks, "device": device,
                      "batch_size": batch_size, "num_fewshot": num_fewshot, "limit": limit})
        return {"results": {t: {"alias": t, "acc,none": 1.0 / (i + 2), "n_params": n}
                            for i, t in enumerate(tasks)}}
''')


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "lm_eval"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lm_eval", raising=False)
    importlib.invalidate_caches()
    yield importlib.import_module("lm_eval")
    sys.modules.pop("lm_eval", None)


def _params(tiny_models, tmp_path):
    p = params_for(tiny_models, tmp_path)
    p["pipeline"]["eval"]["lm_eval"] = {"tasks": ["hellaswag", "arc_easy"], "num_fewshot": 0, "limit": 5}
    return p


def test_benchmarks_without_the_harness_are_refused_before_work(tiny_models, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "lm_eval", raising=False)
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-evaluation-harness is installed here")
    with pytest.raises(MergeError) as err:
        load_params(_params(tiny_models, tmp_path), "p.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "pipeline.eval.lm_eval" in msg and "pip install lm-eval" in msg
    assert not (tmp_path / "out").exists()


def test_bad_benchmark_settings_are_one_line_errors(tiny_models, tmp_path, stand_in):
    p = params_for(tiny_models, tmp_path)
    p["pipeline"]["eval"]["lm_eval"] = {"tasks": []}
    with pytest.raises(MergeError, match=r"pipeline\.eval\.lm_eval\.tasks"):
        load_params(p, "p.yaml")
    p["pipeline"]["eval"]["lm_eval"] = {"tasks": ["x"], "shots": 5}
    with pytest.raises(MergeError, match=r"unknown key 'pipeline\.eval\.lm_eval\.shots'"):
        load_params(p, "p.yaml")


def test_benchmark_step_calls_the_harness(tiny_models, tmp_path, stand_in):
    params = load_params(_params(tiny_models, tmp_path), "p.yaml")
    model = tiny_models["ft-a"]
    first = steps.benchmark(params, model, "rev-1")
    assert [c["tasks"] for c in stand_in.CALLS] == [["hellaswag", "arc_easy"]]
    call = stand_in.CALLS[0]
    assert call["model"] == "hf" and call["args"]["pretrained"] == str(model)
    assert call["args"]["trust_remote_code"] == "False"
    assert (call["device"], call["num_fewshot"], call["limit"], call["batch_size"]) == ("cpu", 0, 5, 8)
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    assert first == {"hellaswag": {"alias": "hellaswag", "acc,none": 0.5, "n_params": n},
                     "arc_easy": {"alias": "arc_easy", "acc,none": 1 / 3, "n_params": n}}
    # the step computes, it keeps no cache: once per revision is the callers' (Prefect's policy,
    # DVC's evaluate stage), by this key, the model's content and the harness settings
    assert steps.benchmark(params, model, "rev-1") == first and len(stand_in.CALLS) == 2
    assert keys.benchmark_key(params, "rev-1") != keys.benchmark_key(params, "rev-2")
    assert not (tmp_path / "out").exists()


def test_results_reach_eval_json_and_mlflow_metrics(tiny_models, tmp_path, stand_in):
    from modelregistry.metrics import score_metrics

    params = load_params(_params(tiny_models, tmp_path), "p.yaml")
    bench = steps.benchmark(params, tiny_models["ft-a"], "rev-1")
    scores = {"merged": {"add": {"kind": "completion", "n": 3, "n_tokens": 6, "loss": 1.0, "exact_match": 0.5,
                                 "n_exact": 1, "max_new_tokens": 4}}}
    summary = steps.summarize(params.model_copy(update={"pipeline": params.pipeline.model_copy(
        update={"experts": {}})}), scores, bench)
    reports.write_eval_report(summary, tmp_path / "report")
    written = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert written["lm_eval"]["hellaswag"]["acc,none"] == 0.5
    assert written["scores"]["merged"]["add"]["exact_match"] == 0.5
    metrics = score_metrics({}, written)
    assert metrics["lm_eval.hellaswag.acc_none"] == 0.5
    assert metrics["lm_eval.arc_easy.acc_none"] == pytest.approx(1 / 3)


def test_benchmarks_alone_without_eval_sets_still_write_eval_json(tiny_models, tmp_path, stand_in):
    p = _params(tiny_models, tmp_path)
    p["pipeline"].pop("experts")
    p["pipeline"].pop("eval_sets")
    params = load_params(p, "p.yaml")
    bench = steps.benchmark(params, tiny_models["base"], "rev-b")
    files = reports.write_eval_report(steps.summarize(params, {}, bench), tmp_path / "r")
    assert json.loads((tmp_path / "r" / "eval.json").read_text()) == {"lm_eval": bench}
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == {}
    assert set(files) == {"metrics", "json"}
