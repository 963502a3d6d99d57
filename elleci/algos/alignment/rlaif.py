"""RLAIF: preference labels and rewards from an LM judge instead of humans (Lee et al. 2024, "RLAIF vs.
RLHF", https://arxiv.org/abs/2309.00267). The judge is any ElleciLM, the policy itself included.

    labeler = PairwiseLabeler(judge, tok, "it")                       # swap-debiased, chat template
    p_a = labeler.label(prompts, responses_a, responses_b)             # [N] soft labels P(a ≻ b) ∈ [0, 1]
    d = labeler.label(prompts, responses_a, responses_b, return_details=True)   # + p_forward, consistency
    scorer = DirectScorer(judge, tok, "en")                            # d-RLAIF: no reward model
    s = scorer.score(prompts, responses)                               # [N] ∈ [−1, 1], higher is better
    rm = reward_model_from_lm(judge, tok); train_reward_model(rm, tok, records, steps=200, lr=1e-4)

Objective (labels): P(a ≻ b) = ½[softmax(ℓ₁, ℓ₂)₁ with a first + softmax(ℓ₁, ℓ₂)₂ with a second];
d-RLAIF reward: (Σ_v v·P(v) − mid) / half-range.

Glossary:
    ℓ₁, ℓ₂      the judge's next-token log-probs of the choice tokens "1" and "2" after the Ending
    P_fwd(pos1) P(position 1) with a in position 1;  P_swap(pos2) P(position 2) with the order swapped
    v, P(v)     rating values (default 1..9) and their probabilities renormalised over those tokens only
    s           expected rating Σ_v v·P(v); normalised to [−1, 1] by the affine map of [lo, hi]
The pairwise prompt has four parts: preamble, optional few-shot exemplars, the sample (context and the two
responses), and the Ending ("Preferred Response="). Every reader here shares one interface (`Scorer`).

Differences from the paper:
1. d-RLAIF rates on 1..9, not 1..10: with split digits "10" is two tokens and has no next-token
   probability. Pass `values` for another scale; each value must be a single token. The paper does not
   say how s is mapped to [−1, 1]; this uses (s − (lo+hi)/2) / ((hi−lo)/2).
2. With `chat=True` (default) the whole four-part text is one user turn and the choice is read as the
   assistant's first token; `chat=False` is the paper's raw-text prompting of a base model.
3. Chain-of-thought (`cot=True`): the greedy rationale (≤ `max_rationale_tokens`, paper 512) is put
   back inside the same user turn, original prompt + rationale request + rationale + Ending, rather than
   as an assistant turn, so the read-out prompt has the same shape with and without CoT.
4. Both spellings "1" and " 1" (those that are single tokens) count for a choice; the paper reads one token.
5. No RL stage here: the soft labels feed iterative DPO or the distilled reward model
   (`elleci.algos.alignment.reward_model`); the paper's REINFORCE with the (1−β)·r reward weight is not implemented.
6. Position consistency (forward and swapped runs prefer the same response) is reported; the paper
   reports the complementary "same position preferred after the swap" rate.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from elleci.algos.alignment.reward_model import (RewardModel, encode_preferences, preference_collate, reward_model_from_lm,
                           reward_model_step, soft_bt_loss, train_reward_model)
from elleci.algos.sampling import choice_probs, complete, next_token_logprobs, prompt_ids, single_token_ids

Tensor = torch.Tensor

__all__ = ["PairwiseTemplate", "PAIRWISE_TEMPLATES", "pairwise_prompt", "preference_from_logprobs", "debias",
           "PairwiseLabeler", "ScoreTemplate", "SCORE_TEMPLATES", "score_prompt", "expected_rating",
           "normalise_rating", "DirectScorer", "Scorer", "RewardModel", "soft_bt_loss", "train_reward_model",
           "reward_model_from_lm", "encode_preferences", "preference_collate", "reward_model_step"]


@runtime_checkable
class Scorer(Protocol):
    """The shared scoring interface: `score(contexts, responses) -> Tensor [N]`, higher is better.
    `DirectScorer` (d-RLAIF, in [−1, 1]) and `RewardModel` (unbounded) both have it."""

    def score(self, contexts: Sequence, responses: Sequence[str]) -> Tensor: ...


# ----------------------------------------------------------------------------------------------
# Templates and prompts

@dataclass(frozen=True)
class PairwiseTemplate:
    """The words of a pairwise labelling prompt; `response` holds "{i}" (1 or 2)."""
    preamble: str
    context: str = "Context:"
    response: str = "Response {i}:"
    ending: str = "Preferred Response="
    rationale_request: str = "Explain which response is better.\nRationale:"


PAIRWISE_TEMPLATES = {
    "en": PairwiseTemplate(
        preamble="A good response is helpful, accurate and harmless. "
                 "Given the context, decide which of the two responses is better."),
    "it": PairwiseTemplate(
        preamble="Una buona risposta è utile, corretta e innocua. "
                 "Dato il contesto, decidi quale delle due risposte è migliore.",
        context="Contesto:", response="Risposta {i}:", ending="Risposta preferita=",
        rationale_request="Spiega quale risposta è migliore.\nMotivazione:"),
}


@dataclass(frozen=True)
class ScoreTemplate:
    """The words of a d-RLAIF rating prompt; `preamble` may hold "{lo}" and "{hi}" (the scale)."""
    preamble: str
    context: str = "Context:"
    response: str = "Response:"
    ending: str = "Rating="


SCORE_TEMPLATES = {
    "en": ScoreTemplate(preamble="Rate how helpful, accurate and harmless the response is, "
                                 "on a scale from {lo} (worst) to {hi} (best)."),
    "it": ScoreTemplate(preamble="Valuta quanto la risposta è utile, corretta e innocua, "
                                 "su una scala da {lo} (pessima) a {hi} (ottima).",
                        context="Contesto:", response="Risposta:", ending="Voto="),
}


def _template(template, table: dict, cls: type):
    if isinstance(template, cls):
        return template
    if isinstance(template, str) and template in table:
        return table[template]
    raise ValueError(f"unknown template language {template!r}; expected one of {sorted(table)} "
                     f"or a {cls.__name__}")


def _context_text(context) -> str:
    """A context string, or a message list rendered as "role: content" lines."""
    if isinstance(context, str):
        return context
    return "\n".join(f"{m['role']}: {m['content']}" for m in context)


def _sample(t: PairwiseTemplate, context, first: str, second: str) -> str:
    return (f"{t.context} {_context_text(context)}\n{t.response.format(i=1)} {first}\n"
            f"{t.response.format(i=2)} {second}")


def pairwise_prompt(template: PairwiseTemplate, context, first: str, second: str,
                    exemplars: Sequence[Mapping] = (), *, rationale: str | None = None,
                    ask_rationale: bool = False) -> str:
    """The four-part labelling text: preamble, exemplars, the sample, then the Ending.

    exemplars: mappings {"context", "first", "second", "label": 1 or 2[, "rationale"]}.
    ask_rationale=True ends with the rationale request instead (CoT step 1); `rationale` given ends with
    rationale request + rationale + Ending (CoT step 2).
    """
    parts = [template.preamble]
    for k, ex in enumerate(exemplars):
        if ex.get("label") not in (1, 2):
            raise ValueError(f"exemplar {k}: label must be 1 or 2, got {ex.get('label')!r}")
        why = f"{template.rationale_request} {ex['rationale']}\n" if ex.get("rationale") else ""
        parts.append(f"{_sample(template, ex['context'], ex['first'], ex['second'])}\n"
                     f"{why}{template.ending}{ex['label']}")
    sample = _sample(template, context, first, second)
    if ask_rationale:
        parts.append(f"{sample}\n{template.rationale_request}")
    elif rationale is not None:
        parts.append(f"{sample}\n{template.rationale_request} {rationale.strip()}\n{template.ending}")
    else:
        parts.append(f"{sample}\n{template.ending}")
    return "\n\n".join(parts)


def score_prompt(template: ScoreTemplate, context, response: str, *, lo: int = 1, hi: int = 9) -> str:
    """The d-RLAIF rating text: preamble (scale lo..hi), the sample, the Ending."""
    return (f"{template.preamble.format(lo=lo, hi=hi)}\n\n{template.context} {_context_text(context)}\n"
            f"{template.response} {response}\n{template.ending}")


# ----------------------------------------------------------------------------------------------
# Pure read-outs

def preference_from_logprobs(logp_1, logp_2) -> Tensor:
    """P(position 1) = softmax over just the two choice log-probs = σ(ℓ₁ − ℓ₂) (§2.1)."""
    l1, l2 = torch.as_tensor(logp_1), torch.as_tensor(logp_2)
    return torch.sigmoid(l1 - l2)


def debias(p_fwd_first, p_swap_second) -> Tensor:
    """P_final(a) = ½[P_fwd(pos1) + P_swap(pos2)]: a sits in position 1 forward, 2 swapped (§2.1)."""
    return 0.5 * (torch.as_tensor(p_fwd_first) + torch.as_tensor(p_swap_second))


def expected_rating(probs: Tensor, values: Sequence[float]) -> Tensor:
    """s = Σ_v v·P(v) (§2.3): probs [..., K] over the K `values` → [...]."""
    probs = torch.as_tensor(probs)
    v = torch.as_tensor(list(values), dtype=probs.dtype if probs.is_floating_point() else torch.float32)
    if probs.shape[-1] != len(v):
        raise ValueError(f"probs has {probs.shape[-1]} entries per row but there are {len(v)} values")
    return (probs * v).sum(-1)


def normalise_rating(s, lo: float, hi: float):
    """Affine map of [lo, hi] onto [−1, 1]: (s − (lo+hi)/2) / ((hi−lo)/2)."""
    if not hi > lo:
        raise ValueError(f"need hi > lo, got lo={lo}, hi={hi}")
    return (s - (lo + hi) / 2) / ((hi - lo) / 2)


# ----------------------------------------------------------------------------------------------
# Judges

def _same_length(**seqs: Sequence) -> int:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"{k} {n}" for k, n in lengths.items()))
    return next(iter(lengths.values()))


class PairwiseLabeler:
    """Soft AI preference labels P(a ≻ b) read from a judge LM's "1"/"2" next-token log-probs (§2.1).

    swap=True runs every pair in both orders (one batch) and averages (`debias`); cot=True first decodes a
    greedy rationale per order. `exemplars` are few-shot examples (see `pairwise_prompt`).
    """

    def __init__(self, model, tokenizer, template: str | PairwiseTemplate = "en", *, chat: bool = True,
                 swap: bool = True, cot: bool = False, max_rationale_tokens: int = 64, batch_size: int = 32,
                 exemplars: Sequence[Mapping] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.template = _template(template, PAIRWISE_TEMPLATES, PairwiseTemplate)
        self.chat, self.swap, self.cot = chat, swap, cot
        self.max_rationale_tokens, self.batch_size = max_rationale_tokens, batch_size
        self.exemplars = tuple(exemplars)
        self.choice_ids = [single_token_ids(tokenizer, ["1", " 1"]), single_token_ids(tokenizer, ["2", " 2"])]
        if set(self.choice_ids[0]) & set(self.choice_ids[1]):
            raise ValueError(f"choice tokens overlap: {self.choice_ids}")

    def position_probs(self, contexts: Sequence, firsts: Sequence[str], seconds: Sequence[str]
                       ) -> tuple[Tensor, list[str] | None]:
        """[N, 2] probabilities of (position 1, position 2), and the rationales when cot=True."""
        t, ex, rationales = self.template, self.exemplars, None
        rows = list(zip(contexts, firsts, seconds))
        if self.cot:
            asks = [pairwise_prompt(t, c, f, s, ex, ask_rationale=True) for c, f, s in rows]
            rationales = complete(self.model, self.tokenizer, prompt_ids(self.tokenizer, asks, chat=self.chat),
                                  max_new_tokens=self.max_rationale_tokens, temperature=0.0,
                                  batch_size=self.batch_size)
            texts = [pairwise_prompt(t, c, f, s, ex, rationale=r) for (c, f, s), r in zip(rows, rationales)]
        else:
            texts = [pairwise_prompt(t, c, f, s, ex) for c, f, s in rows]
        logp = next_token_logprobs(self.model, prompt_ids(self.tokenizer, texts, chat=self.chat),
                                   batch_size=self.batch_size)                 # [N, V]
        return choice_probs(logp, self.choice_ids), rationales                 # [N, 2]

    def label(self, contexts: Sequence, responses_a: Sequence[str], responses_b: Sequence[str], *,
              return_details: bool = False):
        """P(a ≻ b) → [N] float32 in [0, 1]; with return_details a dict: "p", "p_forward" (P_fwd(pos1)),
        "p_swapped" (P_swap(pos2), the swapped run's probability of a; None without swap), "consistency"
        (fraction of pairs where both orders prefer the same response; None without swap), "rationales"."""
        n = _same_length(contexts=contexts, responses_a=responses_a, responses_b=responses_b)
        if n == 0:
            empty = torch.zeros(0)
            return {"p": empty, "p_forward": empty, "p_swapped": None, "consistency": None,
                    "rationales": None} if return_details else empty
        c, a, b = list(contexts), list(responses_a), list(responses_b)
        if self.swap:                                                          # one batch, both orders
            probs, rationales = self.position_probs(c + c, a + b, b + a)
            p_fwd, p_swap = probs[:n, 0], probs[n:, 1]
            p = debias(p_fwd, p_swap)
            consistency = (torch.sign(p_fwd - 0.5) == torch.sign(p_swap - 0.5)).float().mean()
        else:
            probs, rationales = self.position_probs(c, a, b)
            p_fwd, p_swap, consistency = probs[:, 0], None, None
            p = p_fwd
        if not return_details:
            return p
        return {"p": p, "p_forward": p_fwd, "p_swapped": p_swap, "consistency": consistency,
                "rationales": rationales}


class DirectScorer:
    """d-RLAIF (§2.3): the judge rates each response; reward = normalised expected rating ∈ [−1, 1].

    `values` are the rating values (default 1..9, see the module's Differences); each must encode to a
    single token (its digit string, or with a leading space).
    """

    def __init__(self, model, tokenizer, template: str | ScoreTemplate = "en", *,
                 values: Sequence[int] = range(1, 10), chat: bool = True, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.template = _template(template, SCORE_TEMPLATES, ScoreTemplate)
        self.values = list(values)
        if len(self.values) < 2 or len(set(self.values)) != len(self.values):
            raise ValueError(f"values must be at least two distinct ratings, got {self.values}")
        self.lo, self.hi = min(self.values), max(self.values)
        self.chat, self.batch_size = chat, batch_size
        self.value_ids = []
        for v in self.values:
            try:
                self.value_ids.append(single_token_ids(tokenizer, [str(v), f" {v}"]))
            except ValueError:
                raise ValueError(f"rating value {v!r} is not a single token in this tokenizer (e.g. '10' splits "
                                 "into digits): use single-digit values such as range(1, 10)") from None
        flat = [i for ids in self.value_ids for i in ids]
        if len(set(flat)) != len(flat):
            raise ValueError(f"rating values share tokens: {dict(zip(self.values, self.value_ids))}")

    def rating_probs(self, contexts: Sequence, responses: Sequence[str]) -> Tensor:
        """[N, K] P(v) over the K values, renormalised over those tokens only."""
        _same_length(contexts=contexts, responses=responses)
        if len(contexts) == 0:
            return torch.zeros(0, len(self.values))
        texts = [score_prompt(self.template, c, r, lo=self.lo, hi=self.hi) for c, r in zip(contexts, responses)]
        logp = next_token_logprobs(self.model, prompt_ids(self.tokenizer, texts, chat=self.chat),
                                   batch_size=self.batch_size)
        return choice_probs(logp, self.value_ids)

    def score(self, contexts: Sequence, responses: Sequence[str]) -> Tensor:
        """Normalised expected rating → [N] float32 in [−1, 1]; higher is better."""
        s = expected_rating(self.rating_probs(contexts, responses), self.values)
        return normalise_rating(s, self.lo, self.hi)
