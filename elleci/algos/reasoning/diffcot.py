"""DiffCoT: chain-of-thought as step-level denoising over a sliding window, trained with step-level DPO.

Cao, Lin, Gu, Luo, Ma, "DiffCoT: Diffusion-styled Chain-of-Thought" (arXiv 2601.03559). Only the abstract
and secondary summaries are public (no code), so what is below is OUR well-defined formulation of what
they describe (spec `algos_alignment_reasoning.md` §6.2), not the authors' algorithm:

    L = −log σ(β[(log πθ(y⁺|c) − log π_ref(y⁺|c)) − (log πθ(y⁻|c) − log π_ref(y⁻|c))])     (DPO on windows)

    c  = x, clean prefix s_<j0, <revise> drafts ŝ_j(n_j(t)) for j0 <= j < k </revise>
    y⁺ = drafts at the lower noise n_j(t − Δt), then the best (clean) candidate for the new step k
    y⁻ = drafts left at n_j(t) (nothing denoised), then the worst candidate for step k

    pools = [build_pools(candidates, scores) for candidates, scores in per_problem]   # one StepPool per step
    records = build_window_pairs(prompts, solutions, pools, w=3, alpha=1.0, seed=0)
    items = encode_window_pairs(tok, records)
    precompute_reference(model, items, pad_token_id=tok.pad_id)                    # π_ref = the SFT model
    train_loop(model, sample_batches(items, 4, 0, collate_fn("pairs", tok.pad_id)),
               pairwise_step(dpo_loss, beta=0.1, nll_weight=1.0), steps=80, lr=5e-4)
    outs = revise_decode(model_step_fn(model, tok), prompts, w=3)                  # [{"steps", "text", ...}]

Glossary (steps are 0-based in the code):
    x          the prompt; s_1..s_K the reference solution's steps (one a line, `diffcot_data`)
    k          the new step a window pair teaches; w the window length, the new step included, so the
               w − 1 steps before it (positions j0 = k − w + 1 .. k − 1, cut at 0) are revisable drafts
    pool_j     candidate steps for position j given the clean prefix s_<j (M policy samples, optionally the
               reference step), scored by a verifier q and sorted best first
    τ          noise level of a candidate: rank/(|pool| − 1) ∈ [0, 1] (0 = best/clean, 1 = worst)
    n_j(t)     causal schedule: clip(t·(1 + α·(j − j0)/(w − 1)), 0, 1); later steps noisier; w = 1: clip(t)
    ŝ_j(n)     the candidate of pool_j whose τ is nearest n (rank round(n·(|pool| − 1)))
    t, Δt      diffusion time ∈ (0, 1] drawn per pair; denoising stride (Δt = 1: y⁺'s drafts are clean)
    β          DPO's KL weight; log-probs are sums over the target tokens (seq-sum, spec Appendix A)

Inference (`revise_decode`): the clean prefix is frozen; each pass shows the last w − 1 steps as drafts and
the model rewrites them and writes one new step; the oldest step of a full window then freezes. It stops
at the answer step or after `max_steps` passes; `passes` > 1 re-denoises the drafts before each new step.

Oracles (spec §6.3, tested): w = 1 gives exactly step-DPO pairs (x + s_<k, best step, worst step) whatever
t and α; α = 0 gives one noise level for the whole window; n(0) = 0; scores [0.9, 0.1, 0.5] → τ [0, 1, 0.5].

Differences from the paper (as far as its abstract says):
1. The whole formulation is ours (spec §6.2 [I]); the paper's exact objective, schedule and format are
   not public. The window format uses plain-text <revise> marker lines.
2. The new step is always best (y⁺) vs worst (y⁻) of its pool: the causal schedule acts on the drafts, so
   the w = 1 reduction to step-DPO is exact; with w = 2 the single draft sits at the window start and α
   has no effect (use w >= 3 to see it).
3. Drafts at every position are candidates sampled from the *clean* prefix of that position (not chained
   through earlier noisy drafts), so one pool per (problem, position) serves every window and w.
4. A pair is kept only when its chosen side scores strictly higher (sum of q over the drafts and the new
   step); one diffusion time t per (problem, step) unless `times` > 1.
5. The loss is `elleci.algos.alignment.dpo.dpo_loss` through the shared preference machinery (reference log-probs
   precomputed from the SFT model), optionally plus RPO's NLL on y⁺.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elleci.algos.reasoning.diffcot_data import encode_with_context, is_answer_step, parse_output, render_context, render_target
from elleci.algos.sampling import complete, prompt_ids


# ----------------------------------------------------------------------------- noise levels and schedule

def rank_noise(scores: Sequence[float]) -> list[float]:
    """Verifier scores of M candidates → noise levels τ = rank/(M − 1) (rank 0 = highest score; ties keep
    the given order). One candidate: τ = [0]."""
    if not len(scores):
        raise ValueError("rank_noise needs at least one score")
    if any(not math.isfinite(float(s)) for s in scores):
        raise ValueError(f"scores must be finite, got {list(scores)}")
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    tau = [0.0] * len(scores)
    for rank, i in enumerate(order):
        tau[i] = rank / (len(scores) - 1) if len(scores) > 1 else 0.0       # §6.2 (2): τ = rank/(M−1)
    return tau


def causal_schedule(t: float, w: int, alpha: float = 1.0) -> list[float]:
    """Noise level of each of the w window positions at diffusion time t: n_i = clip(t(1 + α i/(w−1)), 0, 1)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"diffusion time t must be in [0, 1], got {t}")
    if w < 1 or alpha < 0:
        raise ValueError(f"need window w >= 1 and alpha >= 0, got w={w}, alpha={alpha}")
    if w == 1:
        return [min(max(t, 0.0), 1.0)]
    return [min(max(t * (1.0 + alpha * i / (w - 1)), 0.0), 1.0) for i in range(w)]    # §6.2 (3): n_j(t)


@dataclass(frozen=True)
class StepPool:
    """The scored candidates of one step position, sorted best first (stable for ties)."""
    steps: tuple[str, ...]
    scores: tuple[float, ...]

    @classmethod
    def from_candidates(cls, steps: Sequence[str], scores: Sequence[float], *, dedupe: bool = True) -> StepPool:
        if len(steps) != len(scores) or not steps:
            raise ValueError(f"need one score per candidate and at least one, got {len(steps)} vs {len(scores)}")
        if any("\n" in s or not s.strip() for s in steps):
            raise ValueError(f"every candidate must be one non-empty line (drop empty samples first): {list(steps)}")
        seen, keep = set(), []
        for s, q in zip(steps, scores):
            if not (dedupe and s in seen):
                seen.add(s)
                keep.append((s, float(q)))
        tau = rank_noise([q for _, q in keep])
        ordered = [keep[i] for i in sorted(range(len(keep)), key=lambda i: tau[i])]
        return cls(tuple(s for s, _ in ordered), tuple(q for _, q in ordered))

    def at(self, noise: float) -> tuple[str, float]:
        """(candidate, score) whose τ is nearest `noise` (rank ⌊noise·(M − 1) + ½⌋)."""
        rank = int(math.floor(noise * (len(self.steps) - 1) + 0.5))
        return self.steps[rank], self.scores[rank]


def build_pools(candidates: Sequence[Sequence[str]], scores: Sequence[Sequence[float]],
                gold: Sequence[str] | None = None, gold_score: float | Sequence[float] | None = None) -> list[StepPool]:
    """One `StepPool` per position of one problem; with `gold`, the reference step is added first to each
    pool (its score: `gold_score` per position, or a constant, default 1.0)."""
    if len(candidates) != len(scores) or (gold is not None and len(gold) != len(candidates)):
        raise ValueError(f"{len(candidates)} positions of candidates, {len(scores)} of scores"
                         + ("" if gold is None else f", {len(gold)} reference steps"))
    pools = []
    for j, (cs, qs) in enumerate(zip(candidates, scores)):
        if gold is not None:
            g = 1.0 if gold_score is None else (gold_score if isinstance(gold_score, (int, float)) else gold_score[j])
            cs, qs = [gold[j], *cs], [float(g), *qs]
        pools.append(StepPool.from_candidates(cs, qs))
    return pools


# ----------------------------------------------------------------------------- windowed preference pairs

def window_pair(pools: Sequence[StepPool], clean: Sequence[str], k: int, *, w: int, alpha: float = 1.0,
                t: float = 1.0, dt: float = 1.0) -> dict | None:
    """The pair teaching step k (0-based) with a window of w steps (module docstring), or None when the
    chosen side does not score strictly higher. `clean` is the reference solution's steps."""
    if not 0 <= k < len(pools) or len(clean) < k:
        raise ValueError(f"step {k} outside {len(pools)} pools / {len(clean)} clean steps")
    if not 0.0 < dt <= 1.0:
        raise ValueError(f"dt must be in (0, 1], got {dt}")
    j0 = k - w + 1                                                        # nominal window start (may be < 0)
    now, lower = causal_schedule(t, w, alpha), causal_schedule(max(t - dt, 0.0), w, alpha)
    drafts = [pools[j].at(now[j - j0]) for j in range(max(j0, 0), k)]     # ŝ_j(n_j(t))
    denoised = [pools[j].at(lower[j - j0]) for j in range(max(j0, 0), k)]  # ŝ_j(n_j(t − Δt))
    best, worst = pools[k].at(0.0), pools[k].at(1.0)
    chosen, rejected = denoised + [best], drafts + [worst]                 # y⁺, y⁻ (context c: clean + drafts)
    q_c, q_r = sum(q for _, q in chosen), sum(q for _, q in rejected)
    if not q_c > q_r:
        return None
    return {"clean": list(clean[:max(j0, 0)]), "drafts": [s for s, _ in drafts], "chosen": [s for s, _ in chosen],
            "rejected": [s for s, _ in rejected], "score_chosen": q_c, "score_rejected": q_r, "k": k, "t": t,
            "noise": now[max(0, -j0):w - 1]}


def build_window_pairs(prompts: Sequence, cleans: Sequence[Sequence[str]], pools: Sequence[Sequence[StepPool]], *,
                       w: int, alpha: float = 1.0, dt: float = 1.0, times: int = 1, seed: int = 0) -> list[dict]:
    """Window pairs for every problem and step (`times` diffusion times t ~ U(0, 1] each, seeded); each
    record also carries "prompt", "context" (text), "chosen_text" and "rejected_text"."""
    if not len(prompts) == len(cleans) == len(pools):
        raise ValueError(f"{len(prompts)} prompts, {len(cleans)} solutions, {len(pools)} pool lists")
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    rng, out = random.Random(f"diffcot/{seed}"), []
    for prompt, clean, ps in zip(prompts, cleans, pools):
        for k in range(len(ps)):
            for _ in range(times):
                pair = window_pair(ps, clean, k, w=w, alpha=alpha, t=1.0 - rng.random(), dt=dt)
                if pair is not None:
                    out.append({"prompt": prompt, **pair, "context": render_context(pair["clean"], pair["drafts"]),
                                "chosen_text": render_target(pair["chosen"]),
                                "rejected_text": render_target(pair["rejected"])})
    return out


def encode_window_pairs(tokenizer, records: Sequence[dict]) -> list[dict]:
    """Records → items of the preference machinery ({"chosen": (ids, labels), "rejected": (ids, labels)}):
    only the target (revised drafts + new step) is scored; prompt, clean prefix and drafts are context."""
    return [{"chosen": encode_with_context(tokenizer, r["prompt"], r["context"], r["chosen_text"]),
             "rejected": encode_with_context(tokenizer, r["prompt"], r["context"], r["rejected_text"])}
            for r in records]


# ----------------------------------------------------------------------------- inference

StepFn = Callable[[Sequence, Sequence[Sequence[str]], Sequence[Sequence[str]]], list[list[str]]]
"""step_fn(prompts, cleans, drafts) → per row at most len(drafts) + 1 steps: the revised drafts, then a new one."""


def model_step_fn(model, tokenizer, *, tokens_per_step: int = 12, batch_size: int = 256) -> StepFn:
    """Greedy `StepFn` of a model: it continues render_context(clean, drafts) and keeps len(drafts) + 1 steps."""
    def step_fn(prompts, cleans, drafts):
        heads = [p + tokenizer.encode(render_context(c, d))
                 for p, c, d in zip(prompt_ids(tokenizer, prompts), cleans, drafts)]
        n_max = max(len(d) for d in drafts) + 1
        texts = complete(model, tokenizer, heads, max_new_tokens=tokens_per_step * n_max, temperature=0.0,
                         batch_size=batch_size)
        return [parse_output(t, len(d) + 1) for t, d in zip(texts, drafts)]
    return step_fn


def revise_decode(step_fn: StepFn, prompts: Sequence, prefixes: Sequence[Sequence[str]] | None = None, *, w: int,
                  passes: int = 1, max_steps: int = 6) -> list[dict]:
    """Solve every prompt by windowed denoising (batched over the unfinished rows).

    State per row: clean (frozen) and drafts (the last w − 1 steps). A given prefix starts there: its
    last w − 1 steps are drafts, the rest frozen. Each of at most `max_steps` rounds calls step_fn
    `passes` times: the first passes − 1 only replace the drafts by their revision; the last also takes
    the new step. The window then slides (steps beyond w − 1 freeze). A row stops at an answer step or
    when the model writes nothing. Returns per row {"steps", "text", "calls", "revised"} (revised: draft
    steps the model changed)."""
    if w < 1 or passes < 1 or max_steps < 1:
        raise ValueError(f"need w, passes, max_steps >= 1, got {w}, {passes}, {max_steps}")
    prefixes = [[] for _ in prompts] if prefixes is None else [list(p) for p in prefixes]
    if len(prefixes) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
    def split(steps):                                                    # (frozen, the last w − 1 as drafts)
        cut = max(0, len(steps) - (w - 1))
        return steps[:cut], steps[cut:]
    state = [dict(zip(("clean", "drafts"), split(p)), calls=0, revised=0, done=False) for p in prefixes]
    for _ in range(max_steps):
        live = [i for i, s in enumerate(state) if not s["done"]]
        if not live:
            break
        for p in range(passes):
            rows = [i for i in live if p == passes - 1 or state[i]["drafts"]]
            outs = step_fn([prompts[i] for i in rows], [state[i]["clean"] for i in rows],
                           [state[i]["drafts"] for i in rows]) if rows else []
            for i, out in zip(rows, outs):
                s, d = state[i], state[i]["drafts"]
                s["calls"] += 1
                s["revised"] += sum(a != b for a, b in zip(out, d))
                if p < passes - 1:                                    # denoise only: keep the draft count
                    s["drafts"] = list(out[:len(d)]) + d[len(out):]
                    continue
                window = list(out)
                if not window or any(is_answer_step(x) for x in window):
                    s["done"] = True
                s["clean"], s["drafts"] = split(s["clean"] + window)
    results = []
    for s in state:
        steps = s["clean"] + s["drafts"]
        results.append({"steps": steps, "text": "\n".join(steps), "calls": s["calls"], "revised": s["revised"]})
    return results
