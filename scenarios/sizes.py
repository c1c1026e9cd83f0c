"""The scenario's sizes: model shape and training budget, one entry per size (``demo``, ``tiny``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScenarioSize:
    """Model shape and training budget of one scenario size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    train_per_task: int
    eval_per_task: int
    batch_size: int
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float
    finetune_lr: float
    warmup_steps: int
    #: torch CPU threads; results are bit-reproducible only for a fixed count.
    num_threads: int
    #: length-sorted pieces each batch is computed in (see _accumulate_gradients);
    #: pays off for the demo model, costs more per-op overhead than it saves for tiny.
    micro_batches: int


SIZES: dict[str, ScenarioSize] = {
    # ~0.9M parameters. Sized by the CPU budget (a few minutes on 2 cores for
    # the whole build): each fine-tune then gets ~0.95-1.0 on its own skill.
    # Eight heads rather than four, and two-digit addition, are what make
    # addition learnable in 300 steps at all.
    "demo": ScenarioSize(
        hidden_size=128,
        num_layers=4,
        num_heads=8,
        intermediate_size=384,
        train_per_task=12_000,
        eval_per_task=200,
        batch_size=64,
        pretrain_steps=300,
        finetune_steps=300,
        pretrain_lr=3e-3,
        # Low enough that fine-tunes stay near the base (smaller, less
        # conflicting task vectors to merge), high enough to learn addition.
        finetune_lr=5e-4,
        warmup_steps=30,
        num_threads=2,
        micro_batches=4,
    ),
    # For the test suite: too small to be good at anything, but each fine-tune
    # still beats the base on its own skill, which is what tests check. One
    # thread: matrices this small gain nothing from two, and a second thread
    # slows to a crawl when test processes share the cores.
    "tiny": ScenarioSize(
        hidden_size=64,
        num_layers=2,
        num_heads=8,
        intermediate_size=192,
        train_per_task=3_000,
        eval_per_task=100,
        batch_size=32,
        pretrain_steps=100,
        finetune_steps=300,
        pretrain_lr=3e-3,
        finetune_lr=5e-3,
        warmup_steps=15,
        num_threads=1,
        micro_batches=1,
    ),
}



@dataclass(frozen=True)
class LoraScenarioSize:
    """The ``lora`` scenario's sizes: the model and its (longer) pretraining in ``model``, whose
    ``finetune_steps``/``finetune_lr`` are each adapter's; the adapters' rank, alpha and modules."""

    model: ScenarioSize
    rank: int
    lora_alpha: int
    target_modules: tuple[str, ...]


_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LORA_SIZES: dict[str, LoraScenarioSize] = {
    # The base is pretrained three times as long as the skills scenario's, on six operations; each
    # adapter (rank 8 on every linear layer, ~6% of the parameters) then teaches a new prompt word
    # for one of them, in 200 steps. Measured (seed 0, 600-step base) at lr 5e-4/1e-3/2e-3: experts
    # 0.97-0.99 and output linearity error 0.24-0.40 at every one (the trigger's switch, not the
    # step size, bends the outputs). 900 pretraining steps rather than 600 kept more in the merges.
    "demo": LoraScenarioSize(
        model=ScenarioSize(
            hidden_size=128, num_layers=4, num_heads=8, intermediate_size=384,
            train_per_task=12_000, eval_per_task=200, batch_size=64,
            pretrain_steps=900, finetune_steps=200, pretrain_lr=3e-3, finetune_lr=1e-3,
            warmup_steps=30, num_threads=2, micro_batches=4),
        rank=8, lora_alpha=16, target_modules=_LINEAR),
    # For the test suite, as ``SIZES["tiny"]``: each expert only has to beat the base on its skill.
    "tiny": LoraScenarioSize(
        model=ScenarioSize(
            hidden_size=64, num_layers=2, num_heads=8, intermediate_size=192,
            train_per_task=3_000, eval_per_task=100, batch_size=32,
            pretrain_steps=300, finetune_steps=200, pretrain_lr=3e-3, finetune_lr=1e-2,
            warmup_steps=15, num_threads=1, micro_batches=1),
        rank=8, lora_alpha=16, target_modules=_LINEAR),
}
