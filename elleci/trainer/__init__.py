"""The trainer every stage of the `elleci` command runs on (and the examples use from Python).

    from elleci.trainer import Trainer, TrainerConfig
    Trainer(model, sft_step, examples, TrainerConfig(steps=100, batch_size=16, micro_batch_size=4, lr=1e-3),
            collate=sft_collate(tok.pad_id)).train()

See `elleci.trainer.core` for the contract of `step_fn` and the accumulation arithmetic.
"""
from .batching import ShuffledSource, accumulation_steps, default_units, micro_batches, scored_tokens, sequences, \
    step_indices
from .checkpoints import ResumeMismatch
from .core import Trainer, TrainerConfig, TrainingInterrupted
from .metrics import trl_aliases

__all__ = ["Trainer", "TrainerConfig", "TrainingInterrupted", "ResumeMismatch", "ShuffledSource",
           "accumulation_steps", "micro_batches", "step_indices", "default_units", "scored_tokens", "sequences",
           "trl_aliases"]
