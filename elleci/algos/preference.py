"""Preference and feedback training around the pure losses: encoding, the reference, the step function.

    items = encode_pairs(tok, pairs)                               # {"prompt", "chosen", "rejected"} records
    precompute_reference(model, items, pad_token_id=tok.pad_id)    # ref log-probs stored with the data
    step = pairwise_step(dpo_loss, beta=0.1, reference="precomputed")
    train_loop(model, sample_batches(items, 8, 0, collate_fn("pairs", tok.pad_id)), step, steps=100, lr=5e-4)

The reference model is explicit (DESIGN §5), one of:
    "precomputed"   log-probs stored in the items (`precompute_reference`): one pass, no second model in
                    memory during training — the path for small GPUs;
    "adapters"      the same model with its LoRA adapters disabled (`disable_adapters`): the reference is
                    whatever the adapters were applied to;
    "frozen"        a frozen deep copy of the model taken at the first step;
    "snapshot"      the trainable parameters at the first step, swapped in for each reference pass;
    an nn.Module    a frozen model given by the caller (`elleci.algos.reference` holds the vocabulary);
    "none"          no reference at all, for the reference-free losses (SimPO, ORPO; `pairwise_step` only).
Single-response feedback (UNA binary / score, KTO) uses the same machinery with `encode_feedback` and
`feedback_step` (KTO: `kl_pairs=True` / `kl_baseline=True`). Log-probs are summed over response tokens unless
`token_reduction="mean"` is given (SimPO, ORPO and IPO use means).

    step = pairwise_step(simpo_loss, reference="none", token_reduction="mean", beta=2.0, gamma=0.5)
    items = encode_feedback(tok, read_binary("fb.jsonl"), "label", kl_pairs=True)
    step = feedback_step(kto_loss, kl_baseline=True, reference="adapters", beta=0.1)
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch

from .reference import check_reference, resolve_reference
from .chat import collate, encode_prompt_response
from .logprobs import IGNORE_INDEX, concatenated_logprobs, sequence_logprobs
from .packing import pack_sequences, packed_sequence_logprobs


def encode_pairs(tokenizer, records: Sequence[dict], max_len: int | None = None) -> list[dict]:
    """{"prompt", "chosen", "rejected"[, ref_chosen_logps, ref_rejected_logps]} → token items."""
    items = []
    for rec in records:
        c_ids, c_lab = encode_prompt_response(tokenizer, rec["prompt"], rec["chosen"], max_len)
        r_ids, r_lab = encode_prompt_response(tokenizer, rec["prompt"], rec["rejected"], max_len)
        item = {"chosen": (c_ids, c_lab), "rejected": (r_ids, r_lab)}
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            if k in rec:
                item[k] = float(rec[k])
        items.append(item)
    return items


def encode_feedback(tokenizer, records: Sequence[dict], target: str, max_len: int | None = None, *,
                    kl_pairs: bool = False) -> list[dict]:
    """{"prompt", "completion", target[, ref_logps]} → token items; target is "label" or "score".

    kl_pairs=True (KTO's KL baseline) also encodes a mismatched pair per item, "kl_response": record i's prompt
    with record i − 1's completion (cyclically, in the given order; `elleci.algos.alignment.kto`)."""
    if kl_pairs and len(records) < 2:
        raise ValueError("kl_pairs needs at least 2 records (each prompt is paired with another record's completion)")
    items = []
    for i, rec in enumerate(records):
        item = {"response": encode_prompt_response(tokenizer, rec["prompt"], rec["completion"], max_len),
                "target": float(rec[target])}
        if kl_pairs:
            item["kl_response"] = encode_prompt_response(tokenizer, rec["prompt"], records[i - 1]["completion"], max_len)
        if "ref_logps" in rec:
            item["ref_logps"] = float(rec["ref_logps"])
        items.append(item)
    return items


def _floats(items, key):
    if not all(key in it for it in items):
        return None
    return torch.tensor([it[key] for it in items], dtype=torch.float32)


def pair_collate(items: Sequence[dict], pad_token_id: int, packing_length: int | None = None) -> dict:
    """Right-padded chosen and rejected batches; packing_length L: instead, all 2n sequences packed into
    rows of ≤ L tokens (`packing.pack_sequences`; "packed", "chosen_index", "rejected_index"), each its own
    document, read back per sequence by `packed_sequence_logprobs` (the labels stay, padded, for the
    token counts)."""
    c_ids, c_lab = collate([it["chosen"] for it in items], pad_token_id)
    r_ids, r_lab = collate([it["rejected"] for it in items], pad_token_id)
    out = {"chosen_labels": c_lab, "chosen_ids": c_ids, "rejected_ids": r_ids, "rejected_labels": r_lab}
    if packing_length:
        del out["chosen_ids"], out["rejected_ids"]
        n = len(items)
        out["packed"], where = pack_sequences([it["chosen"] for it in items] + [it["rejected"] for it in items],
                                              pad_token_id, packing_length)
        out["chosen_index"], out["rejected_index"] = where[:n], where[n:]
    return {**out, "ref_chosen_logps": _floats(items, "ref_chosen_logps"),
            "ref_rejected_logps": _floats(items, "ref_rejected_logps"), "pad_token_id": pad_token_id}


def _responses(out: dict, prefix: str, examples, pad_token_id: int, packing_length: int | None) -> None:
    ids, out[prefix + "labels"] = collate(examples, pad_token_id)
    if packing_length:
        out[prefix + "packed"], out[prefix + "index"] = pack_sequences(examples, pad_token_id, packing_length)
    else:
        out[prefix + "ids"] = ids


def feedback_collate(items: Sequence[dict], pad_token_id: int, packing_length: int | None = None) -> dict:
    """Right-padded responses (and KTO's mismatched pairs); packing_length L: packed as `pair_collate` does."""
    out = {}
    _responses(out, "", [it["response"] for it in items], pad_token_id, packing_length)
    out.update({"target": _floats(items, "target"), "ref_logps": _floats(items, "ref_logps"),
                "pad_token_id": pad_token_id})
    if all("kl_response" in it for it in items):                         # KTO's mismatched pairs
        _responses(out, "kl_", [it["kl_response"] for it in items], pad_token_id, packing_length)
        out["ref_kl_logps"] = _floats(items, "ref_kl_logps")
    return out


def collate_fn(kind: str, pad_token_id: int, packing_length: int | None = None) -> Callable:
    """`sample_batches` collate for "pairs" or "feedback" items (packed into rows of packing_length when given)."""
    fns = {"pairs": pair_collate, "feedback": feedback_collate}
    if kind not in fns:
        raise ValueError(f"unknown item kind {kind!r}; choose one of {sorted(fns)}")
    return functools.partial(fns[kind], pad_token_id=pad_token_id, packing_length=packing_length)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _pair_logps(model, b: dict, token_reduction: str):
    if "packed" in b:                                                    # pair_collate(..., packing_length)
        logps = packed_sequence_logprobs(model, b["packed"], token_reduction=token_reduction)
        return logps[b["chosen_index"]], logps[b["rejected_index"]]
    return concatenated_logprobs(model, b["chosen_ids"], b["chosen_labels"], b["rejected_ids"], b["rejected_labels"],
                                 token_reduction=token_reduction, pad_token_id=b["pad_token_id"])


STEP_REFERENCES = ("adapters", "frozen", "snapshot")       # + "precomputed", read from the batch


def _response_logps(model, b: dict, prefix: str, token_reduction: str) -> torch.Tensor:
    """Log-probs of a feedback batch's responses (prefix "") or mismatched pairs ("kl_"), padded or packed."""
    if prefix + "packed" in b:
        logps = packed_sequence_logprobs(model, b[prefix + "packed"], token_reduction=token_reduction)
        return logps[b[prefix + "index"]]
    return sequence_logprobs(model, b[prefix + "ids"], b[prefix + "labels"], token_reduction=token_reduction)


def _reference_call(resolved: dict, reference, model, fn):
    """fn(π_ref) without gradients; the reference is resolved at the first call ("frozen" and "snapshot"
    copy the model as it is then, i.e. before the first update) and kept in `resolved`."""
    if "ref" not in resolved:
        resolved["ref"] = resolve_reference(model, reference, allowed=STEP_REFERENCES)
    return resolved["ref"].run(fn)


def _nll(logps_sum: torch.Tensor, labels: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the (selected) sequences of the per-token NLL: −Σ_t log π / |y|."""
    n_tok = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    nll = -logps_sum / n_tok
    if select is not None:
        return (nll * select).sum() / select.sum().clamp(min=1)
    return nll.mean()


def _check_reference_free(loss_fn: Callable, reference) -> None:
    """reference="none" is for losses of the policy alone (simpo_loss, orpo_loss): refuse one that takes
    reference log-probs, naming it."""
    if isinstance(reference, str) and reference == "none":
        params = inspect.signature(loss_fn).parameters
        if "ref_chosen_logps" in params or "ref_logps" in params:
            name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
            raise ValueError(f"{name} needs reference log-probs; reference='none' is for reference-free losses "
                             "(simpo_loss, orpo_loss)")


def pairwise_step(loss_fn: Callable, *, reference="precomputed", token_reduction: str = "sum", nll_weight: float = 0.0,
                  **loss_kw) -> Callable:
    """step(model, batch) for `train_loop`: policy log-probs in one concatenated forward, the reference's,
    then `loss_fn(pc, pr, rc, rr, **loss_kw)` (dpo_loss, ipo_loss, hinge_loss, robust_dpo_loss, ...).

    reference="none": no reference at all (no pass, no stored log-probs); `loss_fn(pc, pr, **loss_kw)` for the
    reference-free losses, with token_reduction="mean" (simpo_loss, orpo_loss take per-token mean log-probs).

    `nll_weight` α > 0 adds α·NLL(chosen) (per-token mean), as RPO / Iterative RPO (Pang et al. 2024,
    arXiv 2404.19733) do to stop the chosen likelihood from falling; α = 0 is the plain loss."""
    check_reference(reference, ("precomputed", "none") + STEP_REFERENCES)
    _check_reference_free(loss_fn, reference)
    resolved = {}

    def step(model, batch):
        b = _to(batch, next(model.parameters()).device)
        pc, pr = _pair_logps(model, b, token_reduction)
        if isinstance(reference, str) and reference == "none":
            loss, metrics = loss_fn(pc, pr, **loss_kw)
            return _with_nll(loss, metrics, nll_weight, token_reduction, pc, b["chosen_labels"], None, "nll/chosen")
        if reference == "precomputed":
            if b["ref_chosen_logps"] is None or b["ref_rejected_logps"] is None:
                raise ValueError("reference='precomputed' but the items carry no ref_chosen_logps / "
                                 "ref_rejected_logps: call precompute_reference(ref_model, items) first")
            rc, rr = b["ref_chosen_logps"], b["ref_rejected_logps"]
        else:
            rc, rr = _reference_call(resolved, reference, model, lambda m: _pair_logps(m, b, token_reduction))
        loss, metrics = loss_fn(pc, pr, rc, rr, **loss_kw)
        return _with_nll(loss, metrics, nll_weight, token_reduction, pc, b["chosen_labels"], None, "nll/chosen")
    return step


def _with_nll(loss, metrics, nll_weight, token_reduction, logps, labels, select, key):
    """loss + α·NLL (per-token mean over the selected sequences) when nll_weight α > 0."""
    if not nll_weight:
        return loss, metrics
    if token_reduction != "sum":
        raise ValueError("nll_weight needs token_reduction='sum' (the NLL is normalised per token here)")
    nll = _nll(logps, labels, select)
    return loss + nll_weight * nll, {**metrics, key: nll.detach()}


def _stored(b: dict, key: str, what: str) -> torch.Tensor:
    if b.get(key) is None:
        raise ValueError(f"reference='precomputed' but the items carry no {what}: call "
                         "precompute_reference(ref_model, items) first")
    return b[key]


def feedback_step(loss_fn: Callable, *, reference="precomputed", token_reduction: str = "sum", nll_weight: float = 0.0,
                  kl_baseline: bool = False, **loss_kw) -> Callable:
    """step(model, batch) for single-response feedback: `loss_fn(policy_logps, ref_logps, targets, **loss_kw)`
    (una_binary_loss with labels, una_score_loss with scores). `nll_weight` α > 0 adds α·NLL of the
    responses whose target is 1 (desired / fully correct), as `pairwise_step` does for chosen ones.

    kl_baseline=True (kto_loss): the items' mismatched pairs (`encode_feedback(..., kl_pairs=True)`) are scored by
    the policy (no gradient: KTO detaches its KL baseline) and by the reference (stored as `ref_kl_logps` or a
    reference pass), and passed as `loss_fn(..., kl_policy_logps=, kl_ref_logps=)`."""
    check_reference(reference, ("precomputed",) + STEP_REFERENCES)
    resolved = {}

    def step(model, batch):
        b = _to(batch, next(model.parameters()).device)
        logps = _response_logps(model, b, "", token_reduction)
        score = lambda m, prefix: _response_logps(m, b, prefix, token_reduction)  # noqa: E731
        if reference == "precomputed":
            ref = _stored(b, "ref_logps", "ref_logps")
        else:
            ref = _reference_call(resolved, reference, model, lambda m: score(m, ""))
        kw = dict(loss_kw)
        if kl_baseline:
            if "kl_labels" not in b:
                raise ValueError("kl_baseline needs mismatched pairs in the items: encode_feedback(..., kl_pairs=True)")
            with torch.no_grad():
                kw["kl_policy_logps"] = score(model, "kl_")
            kw["kl_ref_logps"] = (_stored(b, "ref_kl_logps", "ref_kl_logps") if reference == "precomputed" else
                                  _reference_call(resolved, reference, model, lambda m: score(m, "kl_")))
        loss, metrics = loss_fn(logps, ref, b["target"], **kw)
        return _with_nll(loss, metrics, nll_weight, token_reduction, logps, b["labels"],
                         (b["target"] == 1).float(), "nll/desired")
    return step


@torch.no_grad()
def precompute_reference(ref_model, items: list[dict], *, pad_token_id: int = 1, batch_size: int = 32,
                         token_reduction: str = "sum") -> list[dict]:
    """Store the reference log-probs in each item (in place; also returned): ref_chosen_logps /
    ref_rejected_logps for pairs, ref_logps for single responses (and ref_kl_logps for their KTO mismatched
    pairs, when encoded with kl_pairs=True). Run once, before training."""
    was_training = ref_model.training
    ref_model.eval()
    device = next(ref_model.parameters()).device
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            if "chosen" in chunk[0]:
                b = _to(pair_collate(chunk, pad_token_id), device)
                rc, rr = _pair_logps(ref_model, b, token_reduction)
                for it, c, r in zip(chunk, rc.tolist(), rr.tolist()):
                    it["ref_chosen_logps"], it["ref_rejected_logps"] = c, r
            else:
                b = _to(feedback_collate(chunk, pad_token_id), device)
                for it, v in zip(chunk, sequence_logprobs(ref_model, b["ids"], b["labels"], token_reduction=token_reduction).tolist()):
                    it["ref_logps"] = v
                if "kl_ids" in b:                                       # KTO's mismatched pairs
                    kl = sequence_logprobs(ref_model, b["kl_ids"], b["kl_labels"], token_reduction=token_reduction)
                    for it, v in zip(chunk, kl.tolist()):
                        it["ref_kl_logps"] = v
    finally:
        ref_model.train(was_training)
    return items
