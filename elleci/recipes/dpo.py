"""`elleci dpo CONFIG`: offline preference optimisation on {"prompt", "chosen", "rejected"} JSONL.

[loss] type: dpo (sigmoid, Rafailov et al. 2023), cdpo (dpo with label smoothing ε), ipo (Azar et al. 2023,
on per-token MEAN log-probs, as IPO defines its target 1/(2β)), hinge (SLiC), robust (rDPO). The others use
summed response log-probs. [reference] kind: precomputed (one pass before training, stored with the
pairs; the small-GPU path), adapters (the model with its LoRA adapters off = the starting policy), frozen (a
frozen copy in memory). Eval: eval_loss and the implicit-reward metrics (`rewards/accuracies`,
`rewards/margins` under TRL's names, beside ours).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from elleci.algos import dpo_loss, hinge_loss, ipo_loss, orpo_loss, robust_dpo_loss, simpo_loss
from elleci.algos.preference import collate_fn, pairwise_step

from .common import TrainingSettings, attach_lora, fail, load_policy, run_trainer, section, tokenizer_for
from .datasets import pair_items
from .reference_pass import precompute_sharded
from .sections import PairLossSection, ReferenceSection

NAME, HELP = "dpo", "preference optimisation (dpo, cdpo, ipo, hinge, robust) on chosen/rejected pairs"
LOSSES = {"dpo": dpo_loss, "cdpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_dpo_loss,
          "simpo": simpo_loss, "orpo": orpo_loss}
REFERENCE_FREE = ("simpo", "orpo")          # no reference model and no reference pass


@dataclass
class DPOSettings(TrainingSettings):
    loss: PairLossSection = section(PairLossSection)
    reference: ReferenceSection = section(ReferenceSection)
    data_formats = ("auto", "pairwise")
    packing = "each micro-batch's chosen and rejected sequences (batch_size counts pairs)"

    def check(self) -> None:
        super().check()
        check_pair_loss(self.loss)
        check_reference(self)


def check_pair_loss(loss) -> None:
    if loss.type == "cdpo" and loss.label_smoothing == 0:
        fail("loss.label_smoothing", "cdpo is dpo with label smoothing: set it > 0 (e.g. 0.1)")
    if loss.type in ("dpo", "ipo", "hinge") and loss.label_smoothing:
        fail("loss.label_smoothing", f"{loss.type} has no label smoothing (use type = \"cdpo\" or \"robust\")")
    if loss.type in ("ipo", "simpo", "orpo") and loss.nll_weight:
        fail("loss.nll_weight", f"the NLL term is defined on summed log-probs; {loss.type} uses per-token means"
                                + (" (orpo has its own NLL term)" if loss.type == "orpo" else ""))
    if loss.type in ("simpo", "orpo") and loss.label_smoothing:
        fail("loss.label_smoothing", f"{loss.type} has no label smoothing")


def check_reference(cfg) -> None:
    if cfg.reference.kind == "adapters" and not cfg.uses_lora:
        fail("reference.kind", "adapters needs a [lora] section (the reference is the model with them off)")


def loss_kwargs(loss) -> dict:
    kw = {"beta": loss.beta}
    if loss.type in ("cdpo", "robust"):
        kw["label_smoothing"] = loss.label_smoothing
    if loss.type == "simpo":
        kw["gamma"] = loss.gamma
    return kw


def token_reduction(loss) -> str:
    """Per-token mean log-probs for IPO (its target 1/(2β) is per token), SimPO and ORPO (both defined on the
    length-normalised likelihood), sums for the others."""
    return "mean" if loss.type in ("ipo", "simpo", "orpo") else "sum"


Config = DPOSettings


def plan_shape(cfg) -> dict:
    return {"sequences_per_micro_batch": 2 * cfg.train.micro_batch_size,       # packed: at most that many rows
            "reference_copy": cfg.reference.kind == "frozen", "documents": cfg.data.packing}


def packing_length(cfg) -> int | None:
    """[data] packing: each micro-batch's sequences in rows of ≤ max_length tokens (else None: padded)."""
    return cfg.data.max_length if cfg.data.packing else None


def reference_for(kind: str, model, items_list, *, pad_id: int, batch_size: int, token_reduction: str):
    """The reference the step uses, from the STARTING model (call before attaching LoRA): a frozen copy,
    "adapters", or "precomputed" after filling every item's ref log-probs (those the file lacks)."""
    if kind == "frozen":
        return copy.deepcopy(model).eval().requires_grad_(False)
    if kind == "precomputed":
        todo = [it for items in items_list for it in items if "ref_chosen_logps" not in it and "ref_logps" not in it]
        if todo:
            print(f"computing the reference log-probs of {len(todo)} examples (once, before training)")
            precompute_sharded(model, todo, pad_token_id=pad_id, batch_size=batch_size,
                               token_reduction=token_reduction)
    return kind


def run(cfg: DPOSettings, *, allow_changes=()):
    tok = tokenizer_for(cfg)
    d = cfg.data
    train, skipped = pair_items(d.train, tok, d.max_length, d.max_examples)
    evals = pair_items(d.eval, tok, d.max_length, d.max_examples)[0] if d.eval else []
    print(f"{d.train}: {len(train)} pairs" + (f"; {skipped}" if skipped.count else ""))
    if token_reduction(cfg.loss) == "mean" and any("ref_chosen_logps" in it for it in train + evals):
        fail("data.train", f"{cfg.loss.type} uses per-token mean log-probs; the file's ref_*_logps are sums: "
                           "remove them")
    model = load_policy(cfg, lora=False)
    if cfg.loss.type in REFERENCE_FREE:
        ref = "none"                                       # SimPO / ORPO: no reference model, no reference pass
    else:
        ref = reference_for(cfg.reference.kind, model, [train, evals], pad_id=tok.pad_id,
                            batch_size=cfg.train.micro_batch_size, token_reduction=token_reduction(cfg.loss))
    attach_lora(cfg, model)
    step = pairwise_step(LOSSES[cfg.loss.type], reference=ref, token_reduction=token_reduction(cfg.loss),
                         nll_weight=cfg.loss.nll_weight, **loss_kwargs(cfg.loss))
    return run_trainer(cfg, model, step, train, collate=collate_fn("pairs", tok.pad_id, packing_length(cfg)),
                       eval_data=evals or None, tokenizer=tok, allow_changes=allow_changes)
