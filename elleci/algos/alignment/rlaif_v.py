"""RLAIF-V, text version: preference pairs from claim-level AI feedback against a source passage.

RLAIF-V (Yu et al., CVPR 2025, https://arxiv.org/abs/2405.17220; code RLHF-V/RLAIF-V) lowers
hallucination by divide-and-conquer feedback on the policy's own samples. Per iteration:

    records, stats = collect_pairs(policy, labeler, tok, items, k=4, temperature=0.7, seed=0)
    pairs = encode_pairs(tok, records)                              # elleci's pairwise format
    precompute_reference(policy, pairs, pad_token_id=tok.pad_id)    # reference = this iteration's start
    step = pairwise_step(dpo_loss, beta=0.1, reference="precomputed")    # seq-sum log-probs
    train_loop(policy, sample_batches(pairs, 8, 0, collate_fn("pairs", tok.pad_id)), step, steps=100, lr=5e-4)
    best, rewards = best_of_n(policy, "adapters", tok, prompt, candidates, beta=0.1)   # inference time

`items` hold {"prompt", "passage"[, "question"]} (dicts or objects with those attributes, e.g.
`elleci.tasks.grounded_qa.Item`). The labeler may be the policy itself (self-feedback) or any model
with ElleciLM's small interface (`elleci.algos.sampling`).

    1 deconfounded candidates  k samples per prompt from the current policy, one decoding setting
    2 divide                   answer -> atomic claims (`divider`: `split_claims` or `lm_divider`),
                               claim -> yes/no question (`claim_to_question` or `question_by_lm`)
    3 conquer                  labeler reads P(yes), P(no) of its first answer token for
                               "Passage: {passage}\\nQuestion: {question} Please answer yes or no.";
                               a claim is accepted iff p_yes > p_no
    4 combine                  S(y) = #accepted − #claims = −#rejected; no claims -> no score
    5 pairs                    every unordered pair with |S_a − S_b| >= 1, higher score chosen, then at most
                               2 pairs per prompt sampled at random
    6 length balance           drop pairs with (len_rej − len_ch)/len_rej > ρ (words) and identical ones,
                               ρ in {0, 0.02, …, 0.98} minimising |mean len_ch − mean len_rej| / mean len_rej
    7 DPO                      sigmoid DPO on summed log-probs, β = 0.1, reference precomputed
    best-of-N                  r̄(y) = (β/T) Σ_t log π_θ(y_t|x,y_<t) / π_ref(y_t|x,y_<t), argmax over candidates

Differences from the paper:
1. Text instead of images: the labeler checks claims against a passage given in its prompt (spec §3.4).
2. The divider is a fixed prompt to any LM (the paper's wording, no fine-tuned split model), decoded
   greedily; `split_claims` (one claim per sentence) replaces it for models too small to follow it.
3. Claims become questions by a template ("Is it true that <claim>?") by default; `question_by_lm`
   (the paper's changeq prompt, one claim per prompt) is optional.
4. p_yes / p_no sum the variants "yes", " yes", "Yes", " Yes" (resp. "no"…) by their first token
   (`answer_token_ids`) and are renormalised over the answers; the paper sums P("yes")+P("Yes")
   unnormalised (the same decision).
5. `undecidable="filter"` adds a third answer ("unknown") whose claims are left out of the score;
   the default "no" counts them as rejected, as the paper does.
6. The paper drops pairs whose claim count mismatches the judged claims; here every claim is judged.
7. The k candidates are rows of one batch drawn from one seeded generator (`sample_responses`), not
   k runs with different seeds; the distribution is the same.
8. The paper's SFT term (−w·mean log π(y_w)) is `pairwise_step(..., nll_weight=w)` (per-token NLL).
"""
from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from elleci.model.lora import disable_adapters, lora_modules
from elleci.algos.chat import collate, encode_prompt_response
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.judging import (  # noqa: F401 (re-exported: RLAIF-V's steps 2-3 live in judging)
    CLAIM_PROMPT, LABELER_PROMPT, LABELER_PROMPT_UNKNOWN, NO, QUESTION_PROMPT, UNDECIDABLE, UNKNOWN, YES,
    accepted_claims, answer_token_ids, claim_to_question, extract_claims, judge, labeler_prompt, lm_divider,
    parse_bullets, question_by_lm, split_claims, verify_claims)
from elleci.algos.sampling import sample_responses

RHO_GRID = tuple(round(0.02 * i, 2) for i in range(50))          # 0, 0.02, ..., 0.98
_WORD = re.compile(r"\w")

# ---------------------------------------------------------------------------------------- combine

def response_score(accepted: Sequence[bool | int | None]) -> int | None:
    """S = #accepted − #claims = −#rejected over the decided claims (None entries are left out);
    None when no claim is left (the response gets no score and joins no pair)."""
    decided = [int(a) for a in accepted if a is not None]
    return sum(decided) - len(decided) if decided else None


def pair_keys(scores: Mapping | Sequence[int | None], *, min_diff: float = 1, max_pairs: int | None = 2,
                rng: random.Random | None = None) -> list[tuple]:
    """(chosen, rejected) keys over all unordered pairs of scored responses with |S_a − S_b| >= min_diff
    (higher score chosen), then at most `max_pairs` of them drawn with `rng` (default Random(0)).

    `scores`: {key: score} or a sequence indexed by response (None = not scored)."""
    if not min_diff > 0:
        raise ValueError(f"min_diff must be > 0 (ties are never pairs), got {min_diff}")
    items = scores.items() if isinstance(scores, Mapping) else enumerate(scores)
    scored = [(k, s) for k, s in items if s is not None]
    pairs = [(a, b) if sa > sb else (b, a)
             for (a, sa), (b, sb) in itertools.combinations(scored, 2) if abs(sa - sb) >= min_diff]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = (rng or random.Random(0)).sample(pairs, max_pairs)
    return pairs


def _words(text: str) -> int:
    return len(text.split())


def length_balance(pairs: Sequence[Mapping], *, grid: Sequence[float] = RHO_GRID,
                   length: Callable[[str], int] = _words) -> tuple[list, float | None]:
    """(kept pairs, ρ): the ρ of `grid` (first on ties) whose filter — drop pairs with
    (len_rej − len_ch)/len_rej > ρ and pairs whose chosen and rejected texts are identical — leaves
    the smallest |mean len_ch − mean len_rej| / mean len_rej. ([], None) when no ρ keeps a pair."""
    lens = [(length(p["chosen"]), length(p["rejected"]), p["chosen"].strip() == p["rejected"].strip())
            for p in pairs]

    def keep(rho):
        return [i for i, (lc, lr, same) in enumerate(lens) if not same and (lr - lc) / max(lr, 1) <= rho]

    best, best_rho = None, None
    for rho in grid:
        kept = keep(rho)
        mean_r = sum(lens[i][1] for i in kept) / max(len(kept), 1)
        if not kept or mean_r == 0:
            continue
        gap = abs(sum(lens[i][0] for i in kept) / len(kept) - mean_r) / mean_r
        if best is None or gap < best:
            best, best_rho = gap, rho
    if best_rho is None:
        return [], None
    return [pairs[i] for i in keep(best_rho)], best_rho


# ------------------------------------------------------------------------------------ the loop

def _source(x) -> tuple:
    get = x.get if isinstance(x, Mapping) else lambda k, d=None: getattr(x, k, d)
    prompt, passage = get("prompt"), get("passage")
    if prompt is None or passage is None:
        raise ValueError("every item needs a 'prompt' and a 'passage' (dict keys or attributes)")
    question = get("question")
    return prompt, passage, question if question is not None else (prompt if isinstance(prompt, str) else "")


def collect_pairs(policy, labeler, tokenizer, items: Sequence, *, k: int = 4, temperature: float = 0.7,
                  top_p: float | None = None, top_k: int | None = None, max_new_tokens: int = 64, seed: int = 0,
                  divider: Callable[[str, str], list[str]] = split_claims,
                  question_fn: Callable[[str], str] = claim_to_question, min_diff: float = 1,
                  max_pairs: int | None = 2, balance: bool = True, undecidable: str = "no",
                  chat: bool = True, batch_size: int = 64, rollout=None) -> tuple[list[dict], dict]:
    """One RLAIF-V data round (steps 1–6 of the module docstring) -> ({"prompt", "chosen", "rejected"}
    records, stats). Candidates: k samples per prompt from `policy` with identical settings; claims by
    `divider(answer, question)`, questions by `question_fn(claim)`, judged by `labeler` in one batch.
    rollout: a `RolloutConfig` for the sampling (`sample_responses(..., rollout=)`)."""
    sources = [_source(x) for x in items]
    groups = sample_responses(policy, tokenizer, [p for p, _, _ in sources], k=k, temperature=temperature,
                              top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
                              batch_size=batch_size, chat=chat, rollout=rollout)
    claims = [[[c for c in divider(text, q) if _WORD.search(c)] for text in group]
              for (_, _, q), group in zip(sources, groups)]
    prompts = [labeler_prompt(passage, question_fn(c), undecidable=undecidable)
               for (_, passage, _), per_prompt in zip(sources, claims) for cs in per_prompt for c in cs]
    judged = accepted_claims(judge(labeler, tokenizer, prompts, chat=chat, undecidable=undecidable,
                                   batch_size=batch_size))
    decided, verdicts = [v for v in judged if v is not None], iter(judged)
    rng, records, scores_all = random.Random(f"rlaif_v/pairs/{seed}"), [], []
    for (prompt, _, _), group, per_prompt in zip(sources, groups, claims):
        scores = [response_score([next(verdicts) for _ in cs]) for cs in per_prompt]
        scores_all += [s for s in scores if s is not None]
        for c, r in pair_keys(scores, min_diff=min_diff, max_pairs=max_pairs, rng=rng):
            records.append({"prompt": prompt, "chosen": group[c], "rejected": group[r]})
    n_pairs, rho = len(records), None
    if balance and records:
        records, rho = length_balance(records)
    stats = {"candidates": len(sources) * k, "scored": len(scores_all),
             "mean_score": sum(scores_all) / len(scores_all) if scores_all else float("nan"),
             "claims_per_response": len(prompts) / max(len(sources) * k, 1),
             "accept_rate": sum(decided) / len(decided) if decided else float("nan"),
             "pairs": n_pairs, "pairs_kept": len(records), "rho": rho}
    return records, stats


# ----------------------------------------------------------------------- inference-time best-of-N

def length_normalised_reward(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor,
                             beta: float = 0.1) -> torch.Tensor:
    """r̄(y) = (β/T) Σ_t mask_t · (log π_θ − log π_ref)_t, T = Σ_t mask_t, per row: [B, L] -> [B].
    Rows with no scored token get 0. (The summed reward β Σ_t … favours short responses.)"""
    if not (policy_token_logps.shape == ref_token_logps.shape == mask.shape):
        raise ValueError(f"shapes differ: {tuple(policy_token_logps.shape)}, {tuple(ref_token_logps.shape)}, "
                         f"{tuple(mask.shape)}")
    m = mask.to(policy_token_logps.dtype)
    return beta * ((policy_token_logps - ref_token_logps) * m).sum(-1) / m.sum(-1).clamp(min=1)


@torch.no_grad()
def best_of_n(policy, reference, tokenizer, prompt, candidates: Sequence[str], *,
              beta: float = 0.1) -> tuple[int, torch.Tensor]:
    """(index of the best candidate, rewards [N]) under the length-normalised self-reward r̄, with
    `reference` an nn.Module (e.g. the model before alignment) or "adapters" (policy, LoRA disabled)."""
    if not candidates:
        raise ValueError("best_of_n needs at least one candidate")
    device = next(policy.parameters()).device
    ids, labels = collate([encode_prompt_response(tokenizer, prompt, c) for c in candidates], tokenizer.pad_id)
    ids, labels = ids.to(device), labels.to(device)
    if reference == "adapters" and not lora_modules(policy):
        raise ValueError("reference='adapters' needs a policy with LoRA adapters")
    if reference != "adapters" and not isinstance(reference, torch.nn.Module):
        raise ValueError(f"reference must be an nn.Module or 'adapters', got {reference!r}")
    models = [policy] if reference == "adapters" else [policy, reference]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        pol = sequence_logprobs(policy, ids, labels, token_reduction="none")          # [N, L-1] per token
        if reference == "adapters":
            with disable_adapters(policy):
                ref = sequence_logprobs(policy, ids, labels, token_reduction="none")
        else:
            ref = sequence_logprobs(reference, ids, labels, token_reduction="none")
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    rewards = length_normalised_reward(pol, ref, labels[:, 1:] != IGNORE_INDEX, beta).cpu()
    return int(rewards.argmax()), rewards
