"""Evaluation of merged models: eval sets, scoring, MetaGPT's objective, benchmarks, plots, the study.

Plain functions over models and files (no Prefect, MLflow or DVC); the pipeline calls them.

    evalsets   JSONL eval sets, checked; how examples are tokenised for scoring
    scoring    loss, perplexity and exact match of one model (``TaskScores``)
    summary    loss differences, ALD, normalised scores; ``eval.json`` and ``eval.csv``
    lm_eval    the optional lm-evaluation-harness bridge
    plots      PNGs of scores, coefficients, cosine similarities, linearity
    study      the demo study's recipes, table and the paper's linearity check
"""

from .evalsets import load_eval_set, load_eval_sets
from .lm_eval import run_lm_eval
from .scoring import TaskScores, evaluate_loaded, evaluate_model
from .summary import (
    average_loss_difference,
    average_normalized_score,
    loss_difference,
    normalized_scores,
    score_table,
    summarize,
    write_eval_outputs,
)

__all__ = [
    "TaskScores", "load_eval_set", "load_eval_sets", "evaluate_loaded", "evaluate_model", "loss_difference",
    "average_loss_difference", "normalized_scores", "average_normalized_score", "summarize", "score_table",
    "write_eval_outputs", "run_lm_eval",
]
