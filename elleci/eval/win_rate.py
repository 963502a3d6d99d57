"""Win rate of two models judged by a third, swap-debiased, with the RLAIF labeler.

    metrics, samples = evaluate_win_rate(model, tok, baseline, baseline_tok, judge, judge_tok, prompts)

Both models answer every prompt (chat template, greedy, up to `max_new_tokens`, ending at <|im_end|>/EOS);
the judge's `PairwiseLabeler` (elleci.algos.alignment.rlaif, swap=True) reads P(a ≻ b) from its "1"/"2" next-token
probabilities with the candidate's answer first and then second, and averages the two orders:

    p_i = ½ [P_fwd(pos1 | a_i, b_i) + P_swap(pos2 | b_i, a_i)]
    win_rate      = mean_i p_i                                   (the expected preference for the model)
    win_rate_hard = mean_i (1[p_i > ½] + ½·1[p_i = ½])            (wins, ties counted half)
    consistency   = fraction of prompts where both orders prefer the same answer

Swapping makes the score antisymmetric: win_rate(A vs B) + win_rate(B vs A) = 1, and a model against
itself scores exactly ½. `template` picks the labelling prompt's language ("it" or "en").
"""
from __future__ import annotations

from collections.abc import Sequence

from ..algos import PairwiseLabeler
from ..data import read_jsonl
from .generate import generate_until


def read_prompts(path, limit: int | None = None) -> list[str]:
    """The "prompt" strings of a JSONL file (errors name file:line)."""
    prompts = []
    for line, rec in read_jsonl(path):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ValueError(f"{path}:{line}: 'prompt' must be a non-empty string")
        prompts.append(rec["prompt"])
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def chat_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 16
                 ) -> list[str]:
    """Greedy answers to one-turn chat prompts."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    return generate_until(model, tokenizer, ids, [[] for _ in prompts], max_new_tokens=max_new_tokens,
                          batch_size=batch_size)


def evaluate_win_rate(model, tokenizer, baseline, baseline_tokenizer, judge, judge_tokenizer, prompts: Sequence[str],
                      *, template: str = "it", judge_chat: bool = True, max_new_tokens: int = 128,
                      batch_size: int = 16) -> tuple[dict[str, float], list[dict]]:
    """(metrics {"win_rate", "win_rate_hard", "consistency"}, one sample per prompt with both answers and p)."""
    a = chat_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    b = chat_answers(baseline, baseline_tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    labeler = PairwiseLabeler(judge, judge_tokenizer, template, chat=judge_chat, swap=True, batch_size=batch_size)
    d = labeler.label(list(prompts), a, b, return_details=True)
    p = d["p"].double()
    hard = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    metrics = {"win_rate": float(p.mean()), "win_rate_hard": float(hard.mean()), "consistency": float(d["consistency"])}
    samples = [{"prompt": q, "model": x, "baseline": y, "p_model_better": float(pi)}
               for q, x, y, pi in zip(prompts, a, b, p.tolist())]
    return metrics, samples
