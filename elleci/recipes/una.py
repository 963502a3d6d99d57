"""`elleci una CONFIG`: UNA (Wang et al. 2024) on single-response feedback.

    binary  {"prompt", "completion", "label": true/false}  s = σ(β(log π − log π_ref)) → label, by MSE or BCE
    scored  {"prompt", "completion", "score": x}           s → (x − min_score) / (max_score − min_score), by MSE

Summed response log-probs, as the UNA code. [reference] as for dpo: precomputed (default), adapters, copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from elleci.algos import kto_loss, una_binary_loss, una_score_loss
from elleci.algos.preference import collate_fn, feedback_step

from .common import TrainingSettings, attach_lora, fail, load_policy, run_trainer, section, setting, tokenizer_for
from .datasets import feedback_items
from .dpo import check_reference, packing_length, reference_for
from .sections import ReferenceSection

NAME, HELP = "una", "UNA on binary (thumbs up/down) or scored feedback"


@dataclass
class UNALossSection:
    feedback: str = setting("binary", "binary: {label} records; scored: {score} records", choices=("binary", "scored"))
    binary_loss: str = setting("mse", "binary feedback: mse (the paper's default), bce, or kto (KTO with its KL "
                                      "baseline on mismatched pairs: the standard binary-feedback baseline; "
                                      "beta 0.1 as in the paper)", choices=("mse", "bce", "kto"))
    beta: float = setting(0.01, "β of the implicit reward (the paper: 0.01 binary, 0.03 scored)", gt=0)
    min_score: float = setting(0.0, "scored: the lowest raw score (min and max both 0: scores are in [0, 1])")
    max_score: float = setting(0.0, "scored: the highest raw score (e.g. 1 and 10 for UltraFeedback)")
    nll_weight: float = setting(0.0, "adds nll_weight * NLL of the desired (label 1 / score 1) responses", ge=0)


@dataclass
class UNASettings(TrainingSettings):
    loss: UNALossSection = section(UNALossSection)
    reference: ReferenceSection = section(ReferenceSection)
    data_formats = ("auto", "binary", "scored")
    packing = "each micro-batch's responses (and KTO's mismatched pairs; batch_size counts records)"

    def check(self) -> None:
        super().check()
        if self.data.format not in ("auto", self.loss.feedback):
            fail("data.format", f"{self.data.format!r} does not match loss.feedback = {self.loss.feedback!r}")
        lo, hi = self.loss.min_score, self.loss.max_score
        if (lo, hi) != (0.0, 0.0) and not hi > lo:
            fail("loss.max_score", f"must be > min_score ({lo}), got {hi}")
        check_reference(self)


Config = UNASettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": cfg.train.micro_batch_size, "reference_copy": cfg.reference.kind == "frozen",
            "documents": cfg.data.packing}


def step_for(cfg, reference):
    l = cfg.loss
    if l.feedback == "binary" and l.binary_loss == "kto":
        return feedback_step(kto_loss, reference=reference, kl_baseline=True, nll_weight=l.nll_weight, beta=l.beta)
    if l.feedback == "binary":
        return feedback_step(una_binary_loss, reference=reference, nll_weight=l.nll_weight, beta=l.beta,
                             kind=l.binary_loss)
    return feedback_step(una_score_loss, reference=reference, nll_weight=l.nll_weight, beta=l.beta)


def run(cfg: UNASettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d, l = cfg.data, cfg.loss
    read = lambda path: feedback_items(path, l.feedback, tok, d.max_length, d.max_examples,  # noqa: E731
                                       min_score=l.min_score, max_score=l.max_score,
                                       kl_pairs=l.feedback == "binary" and l.binary_loss == "kto")
    train, skipped = read(d.train)
    evals = read(d.eval)[0] if d.eval else []
    print(f"{d.train}: {len(train)} {l.feedback} feedback records" + (f"; {skipped}" if skipped.count else ""))
    model = load_policy(cfg, lora=False)
    ref = reference_for(cfg.reference.kind, model, [train, evals], pad_id=tok.pad_id,
                        batch_size=cfg.train.micro_batch_size, token_reduction="sum")
    attach_lora(cfg, model)
    return run_trainer(cfg, model, step_for(cfg, ref), train,
                       collate=collate_fn("feedback", tok.pad_id, packing_length(cfg)),
                       eval_data=evals or None, tokenizer=tok, allow_changes=allow_changes)
