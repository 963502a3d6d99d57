"""Tests for elleci.algos.alignment.rlaif_v: the spec's oracles (§3.5), each pipeline step, and the loop end to end."""
import copy
import random
import re

import pytest
import torch

from elleci.algos.logprobs import sequence_logprobs
from elleci.algos.chat import collate, encode_prompt_response
from elleci.algos.preference import encode_pairs, pairwise_step, pair_collate, precompute_reference
from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.alignment.rlaif_v import (NO, UNKNOWN, YES, accepted_claims, answer_token_ids, best_of_n, pair_keys,
                                  claim_to_question, collect_pairs, extract_claims, labeler_prompt,
                                  length_balance, length_normalised_reward, parse_bullets, question_by_lm,
                                  response_score, split_claims, verify_claims)
from elleci.algos.sampling import sample_responses
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora, lora_modules
from elleci.tasks.grounded_qa import make_items, parse_claim, pretraining_texts

QUESTION = re.compile(r"Passage: (.*)\nQuestion: Is it true that (.*)\? Please answer")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text("\n".join(pretraining_texts(make_items(300, seed=0))), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=384, split_digits=True)


@pytest.fixture(scope="module")
def policy(tok):
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


class StubLabeler(torch.nn.Module):
    """ElleciLM's scoring interface with controlled logits: every position of a prompt row carries the
    (yes, no[, unknown]) logits that `rule(passage, claim)` gives for the claim in the row's text."""

    def __init__(self, tok, rule, n_choices=2):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.lm_head = torch.nn.Linear(tok.vocab_size, tok.vocab_size, bias=False)   # identity: hidden = logits
        torch.nn.init.eye_(self.lm_head.weight)
        self.tok, self.rule = tok, rule
        self.ids = answer_token_ids(tok, [YES, NO, UNKNOWN][:n_choices])

    def hidden_states(self, x, attention_mask=None):
        out = torch.full((*x.shape, self.tok.vocab_size), -30.0)
        for b, row in enumerate(x.tolist()):
            passage, claim = QUESTION.search(self.tok.decode([t for t in row if t != 0])).groups()
            for ids, logit in zip(self.ids, self.rule(passage, claim)):
                out[b, :, ids] = logit
        return out


def oracle(passage, claim):
    """+5 / −5 logits: yes iff the claim parses and its sentence is in the passage."""
    return (5.0, -5.0) if parse_claim(claim) and claim + "." in passage else (-5.0, 5.0)


# ----------------------------------------------------------------------------- oracles (spec §3.5)

def test_scoring_oracle():
    accepted = accepted_claims(torch.tensor([[0.7, 0.2], [0.1, 0.8], [0.4, 0.5]]))
    assert accepted == [True, False, False]
    assert response_score(accepted) == -2
    assert response_score([]) is None and response_score([None, None]) is None
    assert response_score([True, None, False]) == -1
    assert accepted_claims(torch.tensor([[0.2, 0.1, 0.7], [0.5, 0.2, 0.3]])) == [None, True]


def test_pairing_oracle():
    scores = {"a": 0, "b": -1, "c": 0, "d": -3}
    pairs = pair_keys(scores, min_diff=1, max_pairs=None)
    assert sorted(pairs) == sorted([("a", "b"), ("c", "b"), ("a", "d"), ("c", "d"), ("b", "d")])
    assert ("a", "c") not in pairs and ("c", "a") not in pairs
    assert pair_keys(scores, min_diff=2, max_pairs=None) == [("a", "d"), ("b", "d"), ("c", "d")]
    assert pair_keys([0, None, -1, -1]) == [(0, 2), (0, 3)]          # None: no claims, no pair
    assert pair_keys([-2, -2, -2]) == [] and pair_keys([]) == []
    with pytest.raises(ValueError):
        pair_keys(scores, min_diff=0)


def test_max_pairs_sampling_is_seeded():
    scores = {"a": 0, "b": -1, "c": 0, "d": -3}
    every = set(pair_keys(scores, max_pairs=None))
    draws = [pair_keys(scores, max_pairs=2, rng=random.Random(s)) for s in range(20)]
    assert all(len(d) == 2 and len(set(d)) == 2 and set(d) <= every for d in draws)
    assert draws[3] == pair_keys(scores, max_pairs=2, rng=random.Random(3))     # same seed, same pairs
    assert len({frozenset(d) for d in draws}) > 1                                   # seeds differ
    assert set(pair_keys({"a": 0, "b": -1}, max_pairs=2)) == {("a", "b")}        # fewer than max: all


def test_length_normalised_reward_invariant_to_duplicating_length():
    g = torch.Generator().manual_seed(0)
    pol = -torch.rand(3, 5, generator=g) * 4
    ratio = torch.tensor([[0.3], [-0.2], [1.0]])                    # constant per-token log ratio per row
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False                                              # row 1 has 3 scored tokens
    r = length_normalised_reward(pol, pol - ratio, mask, beta=0.1)
    assert torch.allclose(r, 0.1 * ratio[:, 0])
    pol2, mask2 = torch.cat([pol, pol], 1), torch.cat([mask, mask], 1)
    r2 = length_normalised_reward(pol2, pol2 - ratio, mask2, beta=0.1)
    assert torch.allclose(r2, r)                                     # mean unchanged at twice the length
    summed = lambda p, m: 0.1 * ((ratio * m).sum(-1))               # noqa: E731 - the unnormalised reward
    assert torch.allclose(summed(pol2, mask2), 2 * summed(pol, mask))
    assert length_normalised_reward(pol, pol, torch.zeros_like(mask), beta=0.1).abs().sum() == 0


def test_length_balance_by_hand():
    w = lambda n: " ".join(["w"] * n)                                # noqa: E731
    pairs = [{"chosen": w(5), "rejected": w(5)[:-1] + "v"},         # A (5, 5)
             {"chosen": w(3), "rejected": w(4)},                    # B (3, 4): (4-3)/4 = 0.25
             {"chosen": w(2), "rejected": w(10)},                   # C (2, 10): 0.8
             {"chosen": w(6), "rejected": w(4)},                    # D (6, 4): -0.5
             {"chosen": "same text", "rejected": " same text "}]    # identical: always dropped
    # rho < 0.25: {A, D} gap |5.5-4.5|/4.5 = .222; 0.25 <= rho < 0.8: {A,B,D} |14/3-13/3|/(13/3) = .077;
    # rho >= 0.8: {A,B,C,D} |16/4-23/4|/(23/4) = .304  ->  the first rho of the middle range
    kept, rho = length_balance(pairs)
    assert rho == 0.26 and kept == [pairs[0], pairs[1], pairs[3]]
    assert length_balance([pairs[4]]) == ([], None)
    assert length_balance(pairs, grid=[0.0])[0] == [pairs[0], pairs[3]]


# ----------------------------------------------------------------------------- divide

def test_split_claims_and_bullets():
    assert split_claims("Anna lives in Milan. Anna has a dog.\n- Marco likes tea") == [
        "Anna lives in Milan.", "Anna has a dog.", "Marco likes tea"]
    assert split_claims("") == [] and split_claims("Anna. . !? ...") == ["Anna."]
    assert parse_bullets("### Facts:\n- Anna lives in Milan.\n* Anna has a dog.\n2. X\nnot a bullet") == [
        "Anna lives in Milan.", "Anna has a dog.", "X"]
    assert claim_to_question("Anna lives in Milan.") == "Is it true that Anna lives in Milan?"
    with pytest.raises(ValueError):
        claim_to_question(" . ")


def test_lm_divider_and_converter_fall_back(policy, tok):
    answer = "Anna lives in Milan. Anna has a dog."
    claims = extract_claims(policy, tok, "Where does Anna live?", answer, max_new_tokens=4)
    assert claims == split_claims(answer) or all(isinstance(c, str) and c for c in claims)
    qs = question_by_lm(policy, tok, ["Anna lives in Milan."], max_new_tokens=4)
    assert len(qs) == 1 and qs[0].endswith("?")


# ----------------------------------------------------------------------------- conquer

def test_answer_token_ids_drop_shared_first_tokens():
    class FakeTok:
        table = {"yes": [10, 11], " yes": [5, 10, 11], "Yes": [12], " Yes": [5, 12],
                 "no": [20], " no": [5, 20], "No": [21, 22], " No": [5, 21, 22]}

        def encode(self, s):
            return self.table[s]
    assert answer_token_ids(FakeTok(), [YES, NO]) == [[10, 12], [20, 21]]


def test_verify_claims_reads_controlled_logits(tok):
    logits = {"Anna lives in Milan": (2.0, 0.0), "Anna has a cat": (0.0, 1.0), "Anna likes tea": (1.0, 1.0)}
    labeler = StubLabeler(tok, lambda passage, claim: logits[claim])
    passage = "Anna lives in Milan. Anna has a dog."
    questions = [claim_to_question(c + ".") for c in logits]
    probs = verify_claims(labeler, tok, passage, questions)
    n_yes, n_no = map(len, labeler.ids)
    expected = [torch.sigmoid(torch.tensor(y - n + torch.log(torch.tensor(n_yes / n_no)).item()))
                for y, n in logits.values()]
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.allclose(probs[:, 0], torch.stack(expected), atol=1e-5)
    assert accepted_claims(probs) == [True, False, n_yes > n_no]
    assert verify_claims(labeler, tok, passage, []).shape == (0, 2)


def test_verify_claims_undecidable_filter(tok):
    labeler = StubLabeler(tok, lambda p, c: (0.0, 1.0, 3.0) if "cat" in c else (4.0, 0.0, 0.0), n_choices=3)
    probs = verify_claims(labeler, tok, "Anna lives in Milan.", [claim_to_question("Anna has a cat"),
                                                                  claim_to_question("Anna lives in Milan")],
                          undecidable="filter")
    assert probs.shape == (2, 3) and accepted_claims(probs) == [None, True]
    assert labeler_prompt("P", "Q?", undecidable="filter").endswith("Please answer yes, no or unknown.")
    with pytest.raises(ValueError):
        labeler_prompt("P", "Q?", undecidable="maybe")


# ----------------------------------------------------------------------------- the loop

def _score(passage, text):
    claims = split_claims(text)
    return -sum(oracle(passage, c.rstrip(".!?"))[0] < 0 for c in claims) if claims else None


def test_collect_pairs_end_to_end(policy, tok):
    items = make_items(6, seed=4)
    kw = dict(k=4, temperature=1.0, max_new_tokens=24, seed=3)
    records, stats = collect_pairs(policy, StubLabeler(tok, oracle), tok, items, balance=False, **kw)
    groups = sample_responses(policy, tok, [it.prompt for it in items], k=4, temperature=1.0, max_new_tokens=24,
                              seed=3)
    assert records and stats["candidates"] == 24 and stats["pairs"] == stats["pairs_kept"] == len(records)
    assert stats["scored"] == sum(bool(split_claims(t)) for g in groups for t in g)
    by_prompt = {it.prompt: (it, g) for it, g in zip(items, groups)}
    for rec in records:
        assert set(rec) == {"prompt", "chosen", "rejected"}
        it, group = by_prompt[rec["prompt"]]
        assert rec["chosen"] in group and rec["rejected"] in group
        assert _score(it.passage, rec["chosen"]) >= _score(it.passage, rec["rejected"]) + 1
    assert max(sum(r["prompt"] == it.prompt for r in records) for it in items) <= 2
    balanced, stats_b = collect_pairs(policy, StubLabeler(tok, oracle), tok, items, **kw)
    assert stats_b["pairs"] == len(records) and all(r in records for r in balanced)
    assert stats_b["rho"] is not None and stats_b["pairs_kept"] == len(balanced)
    # the records train with DPO as they are: at the reference the loss is log 2
    enc = encode_pairs(tok, records)
    precompute_reference(policy, enc, pad_token_id=tok.pad_id)
    loss, _ = pairwise_step(dpo_loss, beta=0.1)(policy, pair_collate(enc, tok.pad_id))
    assert loss.item() == pytest.approx(0.693147, abs=1e-4)


def test_collect_pairs_self_feedback_runs(policy, tok):
    items = [{"prompt": it.prompt, "passage": it.passage} for it in make_items(3, seed=1)]
    records, stats = collect_pairs(policy, policy, tok, items, k=3, max_new_tokens=12, seed=0)
    assert stats["candidates"] == 9 and 0 <= stats["pairs_kept"] <= stats["pairs"] <= 6
    assert all(r["chosen"] != r["rejected"] for r in records)
    with pytest.raises(ValueError):
        collect_pairs(policy, policy, tok, [{"prompt": "x"}], k=2)


# ----------------------------------------------------------------------------- best-of-N

def _mean_logps(model, tok, prompt, candidates):
    ids, labels = collate([encode_prompt_response(tok, prompt, c) for c in candidates], tok.pad_id)
    with torch.no_grad():
        return sequence_logprobs(model, ids, labels, token_reduction="mean")


def test_best_of_n(policy, tok):
    prompt = make_items(1, seed=2)[0].prompt
    cands = ["Anna lives in Milan.", "Anna has a dog. Anna likes tea.", "Marco", "Sara works as a baker."]
    idx, r = best_of_n(policy, policy, tok, prompt, cands, beta=0.1)
    assert torch.equal(r, torch.zeros(4))                             # reference == policy: all rewards 0
    torch.manual_seed(1)
    other = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    idx, r = best_of_n(policy, other, tok, prompt, cands, beta=0.5)
    expected = 0.5 * (_mean_logps(policy, tok, prompt, cands) - _mean_logps(other, tok, prompt, cands))
    assert torch.allclose(r, expected, atol=1e-5) and idx == int(expected.argmax())
    base = copy.deepcopy(policy)
    lora = copy.deepcopy(policy)
    apply_lora(lora, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(best_of_n(lora, "adapters", tok, prompt, cands)[1], torch.zeros(4))   # B = 0 at init
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(lora).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
    idx_a, r_a = best_of_n(lora, "adapters", tok, prompt, cands)
    idx_b, r_b = best_of_n(lora, base, tok, prompt, cands)
    assert r_a.abs().sum() > 0 and torch.allclose(r_a, r_b, atol=1e-5) and idx_a == idx_b
    with pytest.raises(ValueError):
        best_of_n(policy, "adapters", tok, prompt, cands)
