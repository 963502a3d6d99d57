"""DiffCoT (our formulation, elleci.algos.reasoning.diffcot): the spec's oracles (§6.3), segmentation, verifiers, window
pairs on hand cases, the windowed decoder's bookkeeping, and the example's --quick run."""
import json

import pytest
import torch

from elleci.algos.reasoning.diffcot import (StepPool, build_pools, build_window_pairs, causal_schedule, encode_window_pairs,
                                  model_step_fn, rank_noise, revise_decode, window_pair)
from elleci.algos.reasoning.diffcot_data import (arithmetic_step_score, encode_with_context, is_answer_step, mc_step_scores,
                                       model_rollouts, parse_output, parse_question, propose_steps, render_context,
                                       render_target, split_steps)
from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.logprobs import sequence_logprobs
from elleci.algos.preference import collate_fn, pairwise_step, precompute_reference
from elleci.algos.chat import collate
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.tasks import arithmetic


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    texts = [f"{p.question}\n{p.solution}" for p in arithmetic.make_problems(300, seed=0, levels=(1, 3))]
    path.write_text("\n".join(texts + ["<revise> </revise>"] * 20), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=300, split_digits=True)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


def pool(*pairs):
    """StepPool from (step, score) pairs."""
    return StepPool.from_candidates([s for s, _ in pairs], [q for _, q in pairs])


# ----------------------------------------------------------------------------- oracles 2 and 3: noise

def test_rank_noise_oracle_and_ties():
    assert rank_noise([0.9, 0.1, 0.5]) == [0.0, 1.0, 0.5]                  # spec §6.3 oracle 3
    assert rank_noise([1.0, 1.0, 0.0]) == [0.0, 0.5, 1.0]                  # ties keep the given order
    assert rank_noise([0.2, 0.7, 0.7, 0.1, 0.9]) == [0.75, 0.25, 0.5, 1.0, 0.0]
    assert rank_noise([0.3]) == [0.0]
    with pytest.raises(ValueError, match="at least one"):
        rank_noise([])
    with pytest.raises(ValueError, match="finite"):
        rank_noise([0.1, float("nan")])


def test_causal_schedule_oracle():
    for w in (1, 2, 3, 5):
        for alpha in (0.0, 0.5, 2.0):
            assert causal_schedule(0.0, w, alpha) == [0.0] * w              # n(0) = 0: all clean
            for t in (0.1, 0.4, 0.7, 1.0):
                n = causal_schedule(t, w, alpha)
                assert len(n) == w and all(0.0 <= x <= 1.0 for x in n)
                assert all(a <= b for a, b in zip(n, n[1:]))               # later steps noisier
                assert n[0] == pytest.approx(t)
                if alpha == 0.0:
                    assert n == pytest.approx([t] * w)                     # α = 0: uniform noise
    assert causal_schedule(0.4, 3, 1.0) == pytest.approx([0.4, 0.6, 0.8])  # t(1 + α j/(w−1))
    assert causal_schedule(0.8, 3, 1.0) == pytest.approx([0.8, 1.0, 1.0])  # clipped at 1
    assert causal_schedule(0.3, 1, 5.0) == [0.3]                           # w = 1: no position term
    with pytest.raises(ValueError, match="diffusion time"):
        causal_schedule(1.5, 2)
    with pytest.raises(ValueError, match="w >= 1"):
        causal_schedule(0.5, 0)


def test_step_pool_sorts_dedupes_and_picks_by_noise():
    p = StepPool.from_candidates(["a", "b", "a", "c", "d"], [0.5, 1.0, 0.5, 0.0, 0.75])
    assert p.steps == ("b", "d", "a", "c") and p.scores == (1.0, 0.75, 0.5, 0.0)
    assert [p.at(n)[0] for n in (0.0, 0.1, 0.4, 0.5, 0.9, 1.0)] == ["b", "b", "d", "a", "c", "c"]
    assert StepPool.from_candidates(["x"], [0.0]).at(1.0) == ("x", 0.0)
    pools = build_pools([["u", "v"]], [[0.0, 0.5]], gold=["g"])          # reference step added, score 1
    assert pools[0].steps == ("g", "v", "u")
    with pytest.raises(ValueError, match="one score per candidate"):
        StepPool.from_candidates(["a"], [])
    with pytest.raises(ValueError, match="non-empty line"):
        StepPool.from_candidates(["a", ""], [1.0, 0.0])


# ----------------------------------------------------------------------------- oracle 1: w = 1 is step-DPO

PROMPT = [{"role": "user", "content": "4 + 7 - 3 = ?"}]
GOLD = ["4 + 7 = 11", "11 - 3 = 8", "Answer: 8"]
POOLS = [pool(("4 + 7 = 11", 1.0), ("4 + 7 = 12", 0.75), ("5 + 7 = 11", 0.5)),
         pool(("11 - 3 = 8", 1.0), ("11 + 3 = 14", 0.75), ("12 - 3 = 8", 0.5)),
         pool(("Answer: 8", 1.0), ("Answer: 11", 0.0), ("Answer: 9", 0.0))]


def test_window_of_one_is_step_dpo_on_best_vs_worst(tok, model):
    hand = [{"prompt": PROMPT, "context": "".join(s + "\n" for s in GOLD[:k]), "chosen_text": render_target([best]),
             "rejected_text": render_target([worst])}
            for k, (best, worst) in enumerate([("4 + 7 = 11", "5 + 7 = 11"), ("11 - 3 = 8", "12 - 3 = 8"),
                                               ("Answer: 8", "Answer: 9")])]
    for alpha, seed in ((0.0, 0), (0.0, 3), (2.0, 1)):                     # t and α play no part
        recs = build_window_pairs([PROMPT], [GOLD], [POOLS], w=1, alpha=alpha, seed=seed)
        assert [{k: r[k] for k in hand[0]} for r in recs] == hand
        assert all(r["drafts"] == [] and r["noise"] == [] for r in recs)
    items = encode_window_pairs(tok, recs)
    direct = [(tok.apply_chat_template(PROMPT, add_generation_prompt=True) + tok.encode(h["context"]), h)
              for h in hand]
    for it, (head, h) in zip(items, direct):                               # tokens: prefix, then the one step
        for side in ("chosen", "rejected"):
            body = tok.encode(h[f"{side}_text"])
            body += [tok.im_end_id] if is_answer_step(h[f"{side}_text"]) else []
            assert it[side] == (head + body, [-100] * len(head) + body)
    # the objective: DPO on seq-sum log-probs of (x + s_<k, best) vs (x + s_<k, worst) against a reference
    ref = ElleciLM(model.config).eval()
    precompute_reference(ref, items, pad_token_id=tok.pad_id)
    batch = collate_fn("pairs", tok.pad_id)(items)
    loss, _ = pairwise_step(dpo_loss, reference="precomputed", beta=0.2)(model, batch)
    logp = lambda m, side: sequence_logprobs(m, *collate([it[side] for it in items], tok.pad_id))  # noqa: E731
    with torch.no_grad():
        expect, _ = dpo_loss(logp(model, "chosen"), logp(model, "rejected"), logp(ref, "chosen"),
                             logp(ref, "rejected"), beta=0.2)
    assert loss.item() == pytest.approx(expect.item(), abs=1e-5)


# ----------------------------------------------------------------------------- window pairs by hand

def test_window_pair_by_hand():
    # k = 2, w = 3: drafts at positions 0, 1; t = 0.5, α = 1 → n = [0.5, 0.75, 1.0]; Δt = 0.25 → [0.25, 0.375]
    p = window_pair(POOLS, GOLD, 2, w=3, alpha=1.0, t=0.5, dt=0.25)
    assert p["clean"] == [] and p["noise"] == pytest.approx([0.5, 0.75])
    assert p["drafts"] == ["4 + 7 = 12", "12 - 3 = 8"]                      # ranks 1 and 2 (of 0..2)
    assert p["chosen"] == ["4 + 7 = 12", "11 + 3 = 14", "Answer: 8"]        # ranks 1, 1, then the best
    assert p["rejected"] == ["4 + 7 = 12", "12 - 3 = 8", "Answer: 9"]       # the drafts as they are, the worst
    assert (p["score_chosen"], p["score_rejected"]) == (2.5, 1.25)
    # Δt = 1: the chosen window is clean; a truncated window (k = 1, j0 = −1) puts position 0 at n[1]
    p = window_pair(POOLS, GOLD, 1, w=3, alpha=1.0, t=0.5, dt=1.0)
    assert p["noise"] == pytest.approx([0.75]) and p["drafts"] == ["5 + 7 = 11"]
    assert p["chosen"] == ["4 + 7 = 11", "11 - 3 = 8"] and p["rejected"] == ["5 + 7 = 11", "12 - 3 = 8"]
    # w = 2 at the last step: one clean step frozen; t = 0.1 leaves the draft clean
    p = window_pair(POOLS, GOLD, 2, w=2, t=0.1)
    assert p["clean"] == GOLD[:1] and p["drafts"] == [GOLD[1]] and p["chosen"] == GOLD[1:]
    rec = build_window_pairs([PROMPT], [GOLD], [POOLS], w=2, seed=0)[-1]
    assert rec["context"] == render_context(rec["clean"], rec["drafts"])
    assert rec["context"].startswith("4 + 7 = 11\n<revise>\n") and rec["context"].endswith("\n</revise>\n")
    tied = [pool(("a", 0.5), ("b", 0.5))] * 2
    assert window_pair(tied, ["a", "a"], 1, w=2, t=1.0) is None            # no strict preference: dropped
    assert len(build_window_pairs([PROMPT], [GOLD], [POOLS], w=3, times=4, seed=0)) == 12
    with pytest.raises(ValueError, match="dt"):
        window_pair(POOLS, GOLD, 1, w=2, dt=0.0)


# ----------------------------------------------------------------------------- segmentation and format

def test_segmentation_and_format():
    assert split_steps("4 + 7 = 11\n11 - 3 = 8\nAnswer: 8") == GOLD
    assert split_steps("  4 + 7 = 11 \n\n<revise>\nx\n</revise>\n") == ["4 + 7 = 11", "x"]
    for p in arithmetic.make_problems(50, seed=1, levels=(1, 3)):           # one line per operation, then the answer
        steps = split_steps(p.solution)
        assert steps[-1] == f"Answer: {p.answer}" and len(steps) == {1: 2, 3: 3}[p.level]
    assert render_context(["a"], ["b", "c"]) == "a\n<revise>\nb\nc\n</revise>\n"
    assert render_context(["a", "b"]) == "a\nb\n"
    assert render_target(["b", "Answer: 3"]) == "b\nAnswer: 3" and render_target(["b"]) == "b\n"
    assert parse_output("x\nAnswer: 2\ny\n", 3) == ["x", "Answer: 2"] and parse_output("x\ny\nz", 2) == ["x", "y"]
    with pytest.raises(ValueError, match="one non-empty line"):
        render_context(["a\nb"])


def test_encode_with_context_scores_only_the_target(tok):
    ids, labels = encode_with_context(tok, PROMPT, "4 + 7 = 11\n", "11 - 3 = 8\nAnswer: 8")
    head = tok.apply_chat_template(PROMPT, add_generation_prompt=True) + tok.encode("4 + 7 = 11\n")
    assert ids[: len(head)] == head and labels[: len(head)] == [-100] * len(head)
    assert ids[-1] == tok.im_end_id and labels[len(head):] == ids[len(head):]
    assert tok.decode(ids[len(head):-1]) == "11 - 3 = 8\nAnswer: 8"
    ids2, _ = encode_with_context(tok, PROMPT, "", "4 + 7 = 11\n")
    assert ids2[-1] != tok.im_end_id and tok.decode(ids2).endswith("4 + 7 = 11\n")


# ----------------------------------------------------------------------------- verifiers

def test_arithmetic_process_verifier_by_hand():
    q = "4 + 7 - 3 = ?"
    assert parse_question(q) == ([4, 7, 3], ["+", "-"])
    assert arithmetic_step_score(q, [], "4 + 7 = 11") == 1.0
    assert arithmetic_step_score(q, [], "4 + 7 = 12") == 0.75               # arithmetic wrong
    assert arithmetic_step_score(q, [], "4 + 6 = 10") == 0.75               # wrong operand, arithmetic right
    assert arithmetic_step_score(q, [], "5 + 7 = 11") == 0.5                # wrong chain start and sum
    assert arithmetic_step_score(q, [], "4 - 7 = -3") == 0.75               # wrong operator
    assert arithmetic_step_score(q, ["4 + 7 = 12"], "12 - 3 = 9") == 1.0    # chains from the prefix as given
    assert arithmetic_step_score(q, GOLD[:2], "Answer: 8") == 1.0
    assert arithmetic_step_score(q, GOLD[:2], "Answer: 9") == 0.0
    assert arithmetic_step_score(q, GOLD[:2], "8 + 0 = 8") == 0.0           # an equation where the answer is due
    assert arithmetic_step_score(q, [], "Answer: 8") == 0.0 and arithmetic_step_score(q, [], "4 +") == 0.0
    for p in arithmetic.make_problems(40, seed=2, levels=(1, 3)):           # every reference step scores 1
        steps = split_steps(p.solution)
        assert all(arithmetic_step_score(p.question, steps[:k], s) == 1.0 for k, s in enumerate(steps))
    with pytest.raises(ValueError, match="not an arithmetic question"):
        parse_question("what is 4 + 7?")


def test_mc_step_scores_with_stub_rollouts():
    calls = []

    def rollout_fn(prompts, contexts, n):          # half the completions of "ok" prefixes reach the answer
        calls.append(len(contexts))
        return [[("Answer: 8" if "ok" in c and r % 2 == 0 else "Answer: 9") for r in range(n)] for c in contexts]
    verify = lambda i, text: arithmetic.extract_answer(text) == 8           # noqa: E731
    scores = mc_step_scores(rollout_fn, verify, ["p", "q"], [[], ["x"]],
                            [["ok 1", "bad", "Answer: 8"], ["Answer: 7", "ok 2", ""]], rollouts=4)
    assert scores == [[0.5, 0.0, 1.0], [0.0, 0.5, 0.0]]                     # answer steps judged directly
    assert calls == [3]                                                     # one batched call, 3 rollout rows
    with pytest.raises(ValueError, match="rollouts"):
        mc_step_scores(rollout_fn, verify, ["p"], [[]], [["a"]], rollouts=0)


# ----------------------------------------------------------------------------- oracle 4: inference windows

REF = ["s1", "s2", "s3", "s4", "s5", "Answer: 6"]


def fixer(fix_all: bool = True):
    """Toy step_fn: rewrites the drafts to the reference steps at their positions (every wrong one, or only
    the first per call) and proposes the next reference step."""
    def step_fn(prompts, cleans, drafts):
        outs = []
        for c, d in zip(cleans, drafts):
            out, fixed = [], False
            for i, s in enumerate(d):
                right = REF[len(c) + i]
                out.append(s if s == right or (fixed and not fix_all) else right)
                fixed |= s != right
            outs.append(out + [REF[len(c) + len(d)]])
        return outs
    return step_fn


@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_planted_wrong_step_fixed_iff_inside_the_window(w):
    L = 4                                                                   # prefix s1..s4, one planted wrong
    for k in range(L):
        prefix = REF[:L]
        prefix[k] = "wrong"
        one = revise_decode(fixer(), ["x"], [prefix], w=w, max_steps=1)[0]
        inside = k >= L - (w - 1)                                           # among the last w − 1 steps
        assert (one["steps"][k] == REF[k]) == inside and one["calls"] == 1
        assert one["steps"][:L - (w - 1)] == prefix[:max(0, L - (w - 1))]   # the frozen prefix is untouched
        full = revise_decode(fixer(), ["x"], [prefix], w=w, max_steps=10)[0]
        assert full["steps"][-1] == "Answer: 6" and full["calls"] == 2      # s5, then the answer
        assert (full["steps"][k] == REF[k]) == inside                       # outside: never fixed
        assert full["revised"] == int(inside)


def test_passes_denoise_the_drafts_before_the_new_step():
    prefix = ["s1", "bad", "bad"]
    one = revise_decode(fixer(fix_all=False), ["x"], [prefix], w=3, passes=1, max_steps=1)[0]
    assert one["steps"] == ["s1", "s2", "bad", "s4"]
    two = revise_decode(fixer(fix_all=False), ["x"], [prefix], w=3, passes=2, max_steps=1)[0]
    assert two["steps"] == ["s1", "s2", "s3", "s4"] and two["calls"] == 2
    batch = revise_decode(fixer(), ["x", "y"], [[], ["s1"]], w=2, max_steps=10)  # rows finish independently
    assert [b["steps"] for b in batch] == [REF, REF] and [b["calls"] for b in batch] == [6, 5]
    with pytest.raises(ValueError, match="prefixes"):
        revise_decode(fixer(), ["x"], [[], []], w=2)


def test_model_backed_candidates_and_steps(tok, model):
    prompts = [PROMPT, [{"role": "user", "content": "3 + 5 = ?"}]]
    cands = propose_steps(model, tok, prompts, [GOLD[:1], []], m=3, max_new_tokens=6, seed=0)
    assert len(cands) == 2 and all(len(c) == 3 and all("\n" not in s for s in c) for c in cands)
    assert cands == propose_steps(model, tok, prompts, [GOLD[:1], []], m=3, max_new_tokens=6, seed=0)
    outs = model_step_fn(model, tok, tokens_per_step=4)(prompts, [[], ["s"]], [["a", "b"], []])
    assert len(outs[0]) <= 3 and len(outs[1]) <= 1
    seen = []
    q = mc_step_scores(model_rollouts(model, tok, max_new_tokens=4), lambda i, text: seen.append((i, text)) is None,
                       prompts, [GOLD[:1], []], [["11 - 3 = 8"], ["Answer: 8", "3 + 5 = 8"]], rollouts=2)
    assert q == [[1.0], [1.0, 1.0]]                                          # a verifier that accepts all
    assert [i for i, _ in seen] == [1, 0, 0, 1, 1]                           # the answer step first, unrolled
    assert seen[0][1] == "Answer: 8\n" and all(t.startswith("4 + 7 = 11\n11 - 3 = 8\n") for _, t in seen[1:3])
    assert all(t.startswith("3 + 5 = 8\n") for _, t in seen[3:])


# ----------------------------------------------------------------------------- the example

def test_example_quick(load_example, tmp_path):
    results = load_example("diffcot").main(["--quick", "--out", str(tmp_path), "--cache", ""])
    saved = json.loads((tmp_path / "results.json").read_text())
    r = saved["results"][0]
    assert results[0]["seed"] == 0 and saved["args"]["quick"] is True
    for arm in ("SFT start", "CoT SFT", "step-DPO", "DiffCoT", "DiffCoT without revision"):
        assert 0.0 <= r[f"accuracy/{arm}"] <= 1.0 and 0.0 <= r[f"self-correction/{arm}"] <= 1.0
    assert r["pairs/step-DPO pairs"] > 0 and r["pairs/DiffCoT pairs"] >= r["pairs/step-DPO pairs"]
    for name in ("sft_adapter", "CoT_SFT", "step-DPO", "DiffCoT"):                 # every arm's adapter saved
        assert (tmp_path / "seed0" / name / "adapter_config.json").is_file()
    mod = load_example("diffcot")
    mod.run_seed = lambda *a, **k: pytest.fail("a finished seed with the same settings must not run again")
    assert mod.main(["--quick", "--out", str(tmp_path), "--cache", ""]) == results
