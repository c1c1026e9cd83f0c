"""Tests of the evaluation package against numbers computed independently in the test itself.

A tiny random Llama and a char-level tokenizer (built offline, BOS added by its template) are saved
once per module; the reference loss is an unbatched float64 loop written here, and the reference
greedy output comes from ``model.generate``, not from the code under test.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from evaluation import (
    TaskScores,
    average_loss_difference,
    average_normalized_score,
    evaluate_loaded,
    evaluate_model,
    load_eval_set,
    loss_difference,
    normalized_scores,
    score_table,
    summarize,
    write_eval_outputs,
)
from metamerge.device import resolve_device
from metamerge.errors import MergeError

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?.,")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2

PAIRS = [
    {"prompt": "what is 2+3?", "completion": " 5"},
    {"prompt": "hi", "completion": "there"},
    {"prompt": "a much longer prompt, with commas", "completion": "ok."},
    {"prompt": "q", "completion": " it is 42"},
    {"prompt": "capital of france?", "completion": "paris"},
]
TEXTS = [{"text": "the quick brown fox"}, {"text": "jumps"}, {"text": "over the lazy dog 123"}]


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False, initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    _build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- independent references


def _plain(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _reference_loss(model, tokenizer, examples):
    """Unbatched, float64 log-softmax, token-weighted mean over the scored tokens."""
    total, count = 0.0, 0
    for ex in examples:
        if "text" in ex:
            ids, start = [BOS] + _plain(tokenizer, ex["text"]) + [EOS], 1
        else:
            context = [BOS] + _plain(tokenizer, ex["prompt"])
            ids, start = context + _plain(tokenizer, ex["completion"]) + [EOS], len(context)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for pos in range(start, len(ids)):
            total -= float(logp[pos - 1, ids[pos]])
            count += 1
    return total / count, count


def _reference_greedy(model, tokenizer, prompt, max_new_tokens):
    """The model's own greedy continuation, by transformers' generate on an unpadded prompt."""
    ids = torch.tensor([[BOS] + _plain(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=PAD, eos_token_id=EOS,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- loss / perplexity


def test_loss_matches_hand_computed_completion_set(loaded):
    model, tokenizer = loaded
    expected, count = _reference_loss(model, tokenizer, PAIRS)
    scores = evaluate_loaded(model, tokenizer, PAIRS, batch_size=2, with_exact_match=False, progress=False)
    assert scores.kind == "completion"
    assert scores.n == len(PAIRS)
    assert scores.n_tokens == count == sum(len(p["completion"]) + 1 for p in PAIRS)
    assert scores.loss == pytest.approx(expected, abs=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert scores.exact_match is None


def test_loss_matches_hand_computed_text_set(model_dir, loaded, tmp_path):
    model, tokenizer = loaded
    expected, count = _reference_loss(model, tokenizer, TEXTS)
    path = _write_jsonl(tmp_path / "text.jsonl", TEXTS)
    scores = evaluate_model(model_dir, {"lm": path}, device="cpu", batch_size=2, progress=False)["lm"]
    assert scores.kind == "text"
    assert scores.n_tokens == count == sum(len(t["text"]) + 1 for t in TEXTS)
    assert scores.loss == pytest.approx(expected, abs=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert scores.exact_match is None and scores.n_exact is None


def test_batched_equals_unbatched(loaded):
    model, tokenizer = loaded
    one = evaluate_loaded(model, tokenizer, PAIRS, batch_size=1, progress=False)
    many = evaluate_loaded(model, tokenizer, PAIRS, batch_size=16, progress=False)
    assert one.n_tokens == many.n_tokens
    assert one.loss == pytest.approx(many.loss, abs=1e-6)
    assert one.exact_match == many.exact_match
    assert one.max_new_tokens == many.max_new_tokens == max(len(p["completion"]) for p in PAIRS) + 2
    again = evaluate_loaded(model, tokenizer, PAIRS, batch_size=16, with_exact_match=False, progress=False)
    assert again.loss == many.loss  # deterministic


def test_restores_training_mode(loaded):
    model, tokenizer = loaded
    model.train()
    try:
        evaluate_loaded(model, tokenizer, TEXTS, progress=False)
        assert model.training
    finally:
        model.eval()


# ---------------------------------------------------------------- exact match


def test_exact_match_on_models_own_greedy_output(loaded):
    """Prompts of different lengths in one batch: left padding must not change the greedy output."""
    model, tokenizer = loaded
    budget = 5
    right = [{"prompt": p["prompt"], "completion": _reference_greedy(model, tokenizer, p["prompt"], budget)}
             for p in PAIRS]
    wrong = [{"prompt": r["prompt"], "completion": r["completion"] + "q"} for r in right]
    for batch_size in (1, 3):
        hit = evaluate_loaded(model, tokenizer, right, batch_size=batch_size, max_new_tokens=budget, progress=False)
        assert (hit.exact_match, hit.n_exact, hit.max_new_tokens) == (1.0, len(PAIRS), budget)
    miss = evaluate_loaded(model, tokenizer, wrong, batch_size=3, max_new_tokens=budget, progress=False)
    assert (miss.exact_match, miss.n_exact) == (0.0, 0)


def test_exact_match_mixed(loaded):
    model, tokenizer = loaded
    good = _reference_greedy(model, tokenizer, "hi", 4)
    examples = [{"prompt": "hi", "completion": f"  {good} "}, {"prompt": "hi", "completion": good + "zz"}]
    scores = evaluate_loaded(model, tokenizer, examples, max_new_tokens=4, progress=False)
    assert scores.exact_match == 0.5 and scores.n_exact == 1


def _argmax_loop(model, tokenizer, prompt, max_new_tokens):
    """Greedy by hand: the full sequence through the model at each step, argmax, stop at EOS."""
    ids = [BOS] + _plain(tokenizer, prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == EOS:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_greedy_ignores_what_the_checkpoint_ships_in_its_generation_config(loaded):
    """A fine-tune's generation_config.json (repetition penalty, n-gram ban, suppressed tokens,
    sampling) does not change its exact match: the answers are a plain argmax loop's, and the
    model's own config is left as it was."""
    import copy

    model, tokenizer = loaded
    model = copy.deepcopy(model)
    budget = 5
    right = [{"prompt": p["prompt"], "completion": _argmax_loop(model, tokenizer, p["prompt"], budget)}
             for p in PAIRS]
    first = {_plain(tokenizer, r["completion"])[0] for r in right if r["completion"]}
    cfg = model.generation_config
    cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.suppress_tokens = 100.0, 1, sorted(first)
    cfg.do_sample, cfg.temperature = True, 5.0
    hit = evaluate_loaded(model, tokenizer, right, batch_size=3, max_new_tokens=budget, progress=False)
    assert (hit.exact_match, hit.n_exact) == (1.0, len(PAIRS))
    assert model.generation_config is cfg and cfg.repetition_penalty == 100.0 and cfg.do_sample


# ---------------------------------------------------------------- eval-set loading


def test_load_eval_set_ok(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "id": 7}\n\n{"prompt": "c", "completion": ""}\n')
    assert load_eval_set(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', 2, "invalid JSON"),
        ('{"prompt": "a"}\n', 1, "missing key"),
        ('{"text": "a"}\n{"text": 3}\n', 2, "'text' must be a string"),
        ('[1, 2]\n', 1, "expected a JSON object"),
        ('{"text": "a"}\n\n{"prompt": "a", "completion": "b"}\n', 3, "one kind per file"),
        ('{"text": "a", "prompt": "b", "completion": "c"}\n', 1, "both"),
    ],
)
def test_load_eval_set_bad_line(tmp_path, content, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_eval_set(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}:")
    assert fragment in message


def test_load_eval_set_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_eval_set(path)


def test_load_eval_set_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty eval set") as info:
        load_eval_set(path)
    assert str(path) in str(info.value)


def test_evaluate_model_fails_on_bad_file_before_loading(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: invalid JSON"):
        evaluate_model(tmp_path / "no-such-model", {"t": bad}, device="cpu", progress=False)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="no CUDA GPU is visible to torch"):
            resolve_device("cuda")


# ---------------------------------------------------------------- objective and outputs


def _scores(loss, em, kind="completion"):
    return TaskScores(kind=kind, n=10, n_tokens=40, loss=loss, perplexity=math.exp(loss),
                      exact_match=em, n_exact=None if em is None else round(em * 10))


def test_loss_difference_and_ald():
    merged = {"math": _scores(1.5, 0.3), "code": _scores(2.0, 0.2), "chat": _scores(3.0, None, "text")}
    experts = {"math": _scores(1.0, 0.6), "code": _scores(2.25, 0.0), "chat": _scores(2.5, None, "text")}
    diffs = loss_difference(merged, experts)
    assert diffs == pytest.approx({"math": 0.5, "code": -0.25, "chat": 0.5})
    assert average_loss_difference(merged, experts) == pytest.approx((0.5 - 0.25 + 0.5) / 3)
    norm = normalized_scores(merged, experts)
    assert norm["math"] == pytest.approx(0.5)
    assert norm["code"] is None  # expert scores 0: undefined, left out of the mean
    assert norm["chat"] is None  # text set: no exact match
    assert average_normalized_score(merged, experts) == pytest.approx(0.5)
    with pytest.raises(KeyError):
        loss_difference({"math": merged["math"]}, experts)


def _all_scores():
    return {
        "merged": {"math": _scores(1.5, 0.3), "code": _scores(2.0, 0.2)},
        "base": {"math": _scores(2.0, 0.1), "code": _scores(2.5, 0.1)},
        "m_expert": {"math": _scores(1.0, 0.6), "code": _scores(3.0, 0.0)},
        "c_expert": {"math": _scores(2.5, 0.1), "code": _scores(1.5, 0.4)},
        "ties": {"math": _scores(1.25, 0.45), "code": _scores(2.5, 0.2)},
    }


def test_summarize_and_write_outputs(tmp_path):
    summary = summarize(_all_scores(), merged="merged", base="base",
                        expert_of={"math": "m_expert", "code": "c_expert"})
    assert summary["tasks"] == ["math", "code"]
    assert summary["loss_difference"] == pytest.approx({"math": 0.5, "code": 0.5})
    assert summary["average_loss_difference"] == pytest.approx(0.5)
    assert summary["normalized_exact_match"] == pytest.approx({"math": 0.5, "code": 0.5})
    assert summary["average_normalized_exact_match"] == pytest.approx(0.5)
    assert summary["objective"]["ties"]["average_loss_difference"] == pytest.approx((0.25 + 1.0) / 2)
    assert summary["objective"]["base"]["normalized_exact_match"]["code"] == pytest.approx(0.25)
    assert summary["scores"]["base"]["math"]["loss"] == 2.0
    assert score_table(summary, "exact_match")["ties"] == {"math": 0.45, "code": 0.2}
    assert list(score_table(summary, "loss")) == ["merged", "base", "m_expert", "c_expert", "ties"]

    paths = write_eval_outputs(tmp_path / "out", summary)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(summary))
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["model"] for r in rows] == ["merged", "base", "m_expert", "c_expert", "ties"]
    assert [r["role"] for r in rows] == ["merged", "base", "expert:math", "expert:code", "other"]
    assert float(rows[0]["math/loss"]) == 1.5 and float(rows[0]["average_loss_difference"]) == 0.5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.csv", "eval.json"]


def test_outputs_are_strict_json_when_perplexity_overflows(tmp_path):
    huge = TaskScores(kind="text", n=1, n_tokens=1, loss=1000.0, perplexity=math.inf)
    assert huge.to_dict()["perplexity"] is None
    summary = summarize({"merged": {"t": huge}, "t": {"t": huge}})
    path = write_eval_outputs(tmp_path, summary)["json"]
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["scores"]["merged"]["t"]["perplexity"] is None
    assert TaskScores.from_dict(data["scores"]["merged"]["t"]).perplexity == math.inf


def test_task_scores_round_trip():
    scores = _scores(1.25, 0.5)
    assert TaskScores.from_dict(json.loads(json.dumps(scores.to_dict()))) == scores
