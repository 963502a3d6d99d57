"""RLAIF (arXiv 2309.00267): pairwise AI labels with swap debiasing, d-RLAIF scores, the soft-label RM."""
import math

import pytest
import torch
from torch import nn

from elleci.algos.alignment.reward_model import encode_preferences, preference_collate
from elleci.algos.alignment.rlaif import (PAIRWISE_TEMPLATES, SCORE_TEMPLATES, DirectScorer, PairwiseLabeler,
                                PairwiseTemplate, RewardModel, Scorer, debias, expected_rating,
                                normalise_rating, pairwise_prompt, preference_from_logprobs,
                                reward_model_from_lm, score_prompt, soft_bt_loss, train_reward_model)
from elleci.algos.sampling import next_token_logprobs, prompt_ids, single_token_ids
from elleci.model import ElleciConfig, ElleciLM, Tokenizer

V = 400


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"Context: question {a} Response 1: yes {a} Response 2: no {b} Preferred Response={1 + (a + b) % 2} "
             f"Rating={a % 9 + 1} Rationale: yes is better" for a in range(10) for b in range(10)]
    lines += ["Contesto: domanda Risposta 1: sì Risposta 2: no Risposta preferita=1 Voto=7 Motivazione: ciao"] * 20
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=V, split_digits=True)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=V)).eval()


class TableJudge(nn.Module):
    """A judge stub: next-token logits looked up per prompt (`table`: ids tuple -> [V]), else `default`."""

    def __init__(self, default, table=None):
        super().__init__()
        self.default, self.table = default, dict(table or {})
        self.lm_head = self._Head(self)

    class _Head(nn.Module):
        def __init__(self, judge):
            super().__init__()
            self.rows = [judge.default]
            self.w = nn.Parameter(torch.zeros(1))   # gives the stub a device

        def forward(self, h):                       # h [B, 1] holds the row index
            return torch.stack([self.rows[int(i)] for i in h[:, 0]])

    def hidden_states(self, ids, attention_mask=None):
        keys = list(self.table)
        self.lm_head.rows = [self.default] + [self.table[k] for k in keys]
        h = torch.zeros(*ids.shape, 1)
        for b, row in enumerate(ids.tolist()):
            n = len(row)
            while n and row[n - 1] == 0:            # next_token_logprobs right-pads with id 0
                n -= 1
            key = tuple(row[:n])
            h[b, n - 1, 0] = keys.index(key) + 1 if key in self.table else 0
        return h


def _logits(tok, lp1, lp2):
    """A full [V] row whose log-softmax gives exactly log p("1") = lp1 and log p("2") = lp2."""
    one, two = single_token_ids(tok, ["1", " 1"]), single_token_ids(tok, ["2", " 2"])
    assert len(one) == len(two) == 1
    rest = 1 - math.exp(lp1) - math.exp(lp2)
    row = torch.full((V,), math.log(rest / (V - 2)), dtype=torch.float64)
    row[one[0]], row[two[0]] = lp1, lp2
    return row.float()


CTX, A, B = ["question 3", "question 7"], ["yes 3", "no 1"], ["no 4", "yes 2"]


# ------------------------------------------------------------------------------------------ pure functions

def test_worked_example_oracle():                                    # spec §2.6 oracle 2
    p_fwd = preference_from_logprobs(torch.tensor(-0.2), torch.tensor(-1.8))
    p_swap_pos1 = preference_from_logprobs(-0.9, -0.7)
    assert round(p_fwd.item(), 4) == 0.8320
    assert round(1 - p_swap_pos1.item(), 4) == 0.5498
    assert round(debias(p_fwd, 1 - p_swap_pos1).item(), 4) == 0.6909
    # softmax over just the two log-probs
    assert torch.allclose(p_fwd, torch.softmax(torch.tensor([-0.2, -1.8]), 0)[0])


def test_expected_and_normalised_rating_oracle():                    # spec §2.6 oracle 4
    values = range(1, 11)
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert expected_rating(uniform, values).item() == pytest.approx(5.5)
    assert normalise_rating(expected_rating(uniform, values), 1, 10).item() == pytest.approx(0.0, abs=1e-12)
    top, bottom = torch.eye(10)[9], torch.eye(10)[0]
    assert normalise_rating(expected_rating(top, values), 1, 10).item() == pytest.approx(1.0)
    assert normalise_rating(expected_rating(bottom, values), 1, 10).item() == pytest.approx(-1.0)
    assert expected_rating(torch.stack([top, bottom]), values).tolist() == [10.0, 1.0]
    with pytest.raises(ValueError, match="9 values"):
        expected_rating(uniform, range(1, 10))
    with pytest.raises(ValueError, match="hi > lo"):
        normalise_rating(3.0, 5, 5)


def test_soft_bt_loss_zero_gradient_at_half():                       # spec §2.6 oracle 5
    margin = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    loss, _ = soft_bt_loss(margin + 0.7, torch.full((3,), 0.7, dtype=torch.float64), torch.full((3,), 0.5))
    loss.backward()
    assert torch.equal(margin.grad, torch.zeros(3, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(2))


def test_soft_bt_loss_hard_label_is_bradley_terry_and_metrics():
    ra = torch.tensor([1.3, -0.4, 2.0], dtype=torch.float64)
    rb = torch.tensor([0.1, 0.6, 2.5], dtype=torch.float64)
    loss, m = soft_bt_loss(ra, rb, torch.ones(3), reduction="none")
    hand = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(ra.tolist(), rb.tolist())]
    assert loss.dtype == torch.float64 and torch.allclose(loss, torch.tensor(hand, dtype=torch.float64), atol=1e-12)
    # P = 0 is the mirror image; soft P interpolates linearly between the two
    l0, _ = soft_bt_loss(ra, rb, torch.zeros(3), reduction="none")
    assert torch.allclose(l0, soft_bt_loss(rb, ra, torch.ones(3), reduction="none")[0])
    l3, _ = soft_bt_loss(ra, rb, torch.full((3,), 0.3), reduction="none")
    assert torch.allclose(l3, 0.3 * loss + 0.7 * l0)
    assert m["rewards/margin"].item() == pytest.approx((ra - rb).mean().item())
    assert m["rewards/accuracy"].item() == pytest.approx(1 / 3)        # only the first has r_a > r_b
    _, m2 = soft_bt_loss(ra, rb, torch.tensor([0.9, 0.2, 0.1]))
    assert m2["rewards/accuracy"].item() == pytest.approx(1.0)
    assert soft_bt_loss(ra, rb, torch.ones(3), reduction="sum")[0].item() == pytest.approx(sum(hand))
    with pytest.raises(ValueError, match=r"p_a must lie in \[0, 1\]"):
        soft_bt_loss(ra, rb, torch.tensor([0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match="shape mismatch"):
        soft_bt_loss(ra, rb[:2], torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        soft_bt_loss(ra, rb, torch.ones(3), reduction="avg")


# ------------------------------------------------------------------------------------------ prompts

def test_pairwise_prompt_four_parts_and_languages():
    en = PAIRWISE_TEMPLATES["en"]
    ex = [{"context": "question 1", "first": "yes 1", "second": "no 1", "label": 1, "rationale": "yes is better"}]
    text = pairwise_prompt(en, "question 3", "yes 3", "no 4", ex)
    parts = text.split("\n\n")
    assert parts[0] == en.preamble and len(parts) == 3
    assert parts[1].endswith("Rationale: yes is better\nPreferred Response=1")
    assert parts[2] == "Context: question 3\nResponse 1: yes 3\nResponse 2: no 4\nPreferred Response="
    ask = pairwise_prompt(en, "question 3", "yes 3", "no 4", ask_rationale=True)
    assert ask.endswith("Response 2: no 4\nExplain which response is better.\nRationale:")
    cot = pairwise_prompt(en, "question 3", "yes 3", "no 4", rationale=" 1 is better ")
    assert cot == ask + " 1 is better\nPreferred Response="
    it = pairwise_prompt(PAIRWISE_TEMPLATES["it"], "domanda", "sì", "no")
    assert "Risposta 1: sì\nRisposta 2: no" in it and it.endswith("Risposta preferita=")
    assert score_prompt(SCORE_TEMPLATES["it"], "domanda", "sì").endswith("Risposta: sì\nVoto=")
    assert "from 1 (worst) to 9 (best)" in score_prompt(SCORE_TEMPLATES["en"], "q", "r")
    with pytest.raises(ValueError, match="label must be 1 or 2"):
        pairwise_prompt(en, "q", "a", "b", [{"context": "q", "first": "a", "second": "b", "label": 3}])


# ------------------------------------------------------------------------------------------ stub judges

def test_swap_averaging_cancels_pure_position_bias(tok):              # spec §2.6 oracle 1
    judge = TableJudge(_logits(tok, math.log(0.8) - 1, math.log(0.2) - 1))      # p(pos1) = 0.8 always
    d = PairwiseLabeler(judge, tok).label(CTX, A, B, return_details=True)
    assert torch.allclose(d["p_forward"], torch.full((2,), 0.8), atol=1e-6)
    assert torch.allclose(d["p_swapped"], torch.full((2,), 0.2), atol=1e-6)
    assert torch.allclose(d["p"], torch.full((2,), 0.5), atol=1e-6)
    assert d["consistency"].item() == 0.0                             # always the same position: inconsistent
    no_swap = PairwiseLabeler(judge, tok, swap=False).label(CTX, A, B, return_details=True)
    assert torch.allclose(no_swap["p"], torch.full((2,), 0.8), atol=1e-6) and no_swap["consistency"] is None


def test_worked_example_through_the_labeler(tok):
    lab = PairwiseLabeler(None, tok, "en")
    fwd, swp = (prompt_ids(tok, [pairwise_prompt(lab.template, "question 3", x, y)])[0]
                for x, y in (("yes 3", "no 4"), ("no 4", "yes 3")))
    lab.model = TableJudge(_logits(tok, -1.0, -1.0), {tuple(fwd): _logits(tok, -0.2, -1.8),
                                                      tuple(swp): _logits(tok, -0.9, -0.7)})
    d = lab.label(["question 3"], ["yes 3"], ["no 4"], return_details=True)
    assert round(d["p_forward"].item(), 4) == 0.8320
    assert round(d["p_swapped"].item(), 4) == 0.5498
    assert round(d["p"].item(), 4) == 0.6909 and d["consistency"].item() == 1.0


def test_readout_ignores_unrelated_vocabulary_mass(tok):            # spec §2.6 oracle 3
    base = torch.randn(V, generator=torch.Generator().manual_seed(0))
    bumped = base.clone()
    bumped[tok.encode("yes")[-1]] += 25.0
    p0 = PairwiseLabeler(TableJudge(base), tok).label(CTX, A, B, return_details=True)
    p1 = PairwiseLabeler(TableJudge(bumped), tok).label(CTX, A, B, return_details=True)
    for k in ("p", "p_forward", "p_swapped"):
        assert torch.allclose(p0[k], p1[k], atol=1e-5)
    s0, s1 = (DirectScorer(TableJudge(x), tok).score(CTX, A) for x in (base, bumped))
    assert torch.allclose(s0, s1, atol=1e-5)


def test_direct_scorer_limits_with_a_stub(tok):
    scorer = DirectScorer(TableJudge(torch.zeros(V)), tok)            # uniform over 1..9 -> s = 5 -> 0
    assert torch.allclose(scorer.score(CTX, A), torch.zeros(2), atol=1e-6)
    nine = torch.zeros(V)
    nine[single_token_ids(tok, ["9"])[0]] = 50.0
    assert torch.allclose(DirectScorer(TableJudge(nine), tok).score(CTX, A), torch.ones(2), atol=1e-6)
    one = torch.zeros(V)
    one[single_token_ids(tok, ["1"])[0]] = 50.0
    assert torch.allclose(DirectScorer(TableJudge(one), tok, values=[1, 5]).score(CTX, A), -torch.ones(2), atol=1e-6)
    assert isinstance(scorer, Scorer)


def test_errors_name_the_problem(tok):
    judge = TableJudge(torch.zeros(V))
    with pytest.raises(ValueError, match="length mismatch: contexts 2, responses_a 1, responses_b 2"):
        PairwiseLabeler(judge, tok).label(CTX, A[:1], B)
    with pytest.raises(ValueError, match="length mismatch"):
        DirectScorer(judge, tok).score(CTX, A[:1])
    with pytest.raises(ValueError, match="unknown template language 'fr'"):
        PairwiseLabeler(judge, tok, "fr")
    with pytest.raises(ValueError, match="unknown template language 'de'"):
        DirectScorer(judge, tok, "de")
    with pytest.raises(ValueError, match="rating value 10 is not a single token"):
        DirectScorer(judge, tok, values=range(1, 11))
    with pytest.raises(ValueError, match="at least two distinct"):
        DirectScorer(judge, tok, values=[3, 3])
    custom = PairwiseTemplate(preamble="Which is better?")
    assert PairwiseLabeler(judge, tok, custom).template is custom
    assert PairwiseLabeler(judge, tok).label([], [], []).shape == (0,)


# ------------------------------------------------------------------------------------------ a real tiny ElleciLM

def test_labeler_on_a_real_model_matches_manual_readout(tok, lm):
    one, two = single_token_ids(tok, ["1", " 1"]), single_token_ids(tok, ["2", " 2"])
    for chat in (True, False):
        lab = PairwiseLabeler(lm, tok, "en", chat=chat)
        d = lab.label(CTX, A, B, return_details=True)
        assert d["p"].shape == (2,) and bool(((d["p"] >= 0) & (d["p"] <= 1)).all())
        fwd = [pairwise_prompt(lab.template, c, a, b) for c, a, b in zip(CTX, A, B)]
        swp = [pairwise_prompt(lab.template, c, b, a) for c, a, b in zip(CTX, A, B)]
        lp = next_token_logprobs(lm, prompt_ids(tok, fwd + swp, chat=chat)).double()
        l1, l2 = lp[:, one].logsumexp(-1), lp[:, two].logsumexp(-1)
        manual = torch.sigmoid(l1 - l2)
        assert torch.allclose(d["p_forward"].double(), manual[:2], atol=1e-5)
        assert torch.allclose(d["p_swapped"].double(), 1 - manual[2:], atol=1e-5)
        assert torch.allclose(d["p"].double(), (manual[:2] + 1 - manual[2:]) / 2, atol=1e-5)
        assert 0.0 <= d["consistency"].item() <= 1.0
        no_swap = PairwiseLabeler(lm, tok, chat=chat, swap=False).label(CTX, A, B)
        assert torch.allclose(no_swap, d["p_forward"], atol=1e-6)


def test_cot_labeler_reads_after_its_rationale(tok, lm):
    lab = PairwiseLabeler(lm, tok, "it", cot=True, max_rationale_tokens=6)
    d = lab.label(CTX, A, B, return_details=True)
    assert bool(((d["p"] >= 0) & (d["p"] <= 1)).all()) and len(d["rationales"]) == 4   # both orders
    texts = [pairwise_prompt(lab.template, c, a, b, rationale=r)
             for (c, a, b), r in zip(zip(CTX, A, B), d["rationales"][:2])]
    lp = next_token_logprobs(lm, prompt_ids(tok, texts))
    one, two = single_token_ids(tok, ["1"]), single_token_ids(tok, ["2"])
    assert torch.allclose(d["p_forward"], preference_from_logprobs(lp[:, one[0]], lp[:, two[0]]), atol=1e-5)


def test_direct_scorer_on_a_real_model(tok, lm):
    scorer = DirectScorer(lm, tok, "en")
    s = scorer.score(CTX, A)
    assert s.shape == (2,) and bool(((s >= -1) & (s <= 1)).all())
    probs = scorer.rating_probs(CTX, A)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(s, (probs @ torch.arange(1.0, 10.0) - 5) / 4, atol=1e-5)


def test_reward_model_padding_and_interface(tok, lm):
    rm = reward_model_from_lm(lm, tok)
    assert isinstance(rm, RewardModel) and rm.backbone is not lm and isinstance(rm, Scorer)
    assert torch.equal(rm.score(CTX, A), torch.zeros(2))              # zero-initialised head
    nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    batch = rm.score(CTX + ["question 12345 with a much longer context"], A + ["yes"])
    alone = torch.cat([rm.score([c], [a]) for c, a in zip(CTX, A)])
    assert torch.allclose(batch[:2], alone, atol=1e-5)              # right padding does not leak
    ids = rm.encode(CTX[:1], A[:1])[0]
    h = lm.hidden_states(torch.tensor([ids]))[0, -1]                   # read at the last (im_end) token
    assert ids[-1] == tok.im_end_id and torch.allclose(batch[0], rm.head(h).squeeze(), atol=1e-5)
    with pytest.raises(ValueError, match="length mismatch"):
        rm.score(CTX, A[:1])
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 3\]"):
        rm(torch.zeros(1, 3, dtype=torch.long), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"record 0: p_a must lie in \[0, 1\]"):
        encode_preferences(tok, [{"prompt": "q", "response_a": "a", "response_b": "b", "p_a": 2}])
    item = encode_preferences(tok, [{"prompt": "q", "response_a": "yes", "response_b": "no 12", "p_a": 0.9}])
    b = preference_collate(item, tok.pad_id)
    assert b["ids"].shape[0] == 2 and b["lengths"].tolist() == [len(item[0]["a"]), len(item[0]["b"])]


def _toy(n, offset, seed):
    g = torch.Generator().manual_seed(seed)
    recs = []
    for k in range(n):
        q = f"question {offset + k}"
        num = int(torch.randint(0, 100, (1,), generator=g))
        yes, no = f"yes {num}", f"no {num}"
        if k % 2:
            recs.append({"prompt": q, "response_a": yes, "response_b": no, "p_a": 0.9})
        else:
            recs.append({"prompt": q, "response_a": no, "response_b": yes, "p_a": 0.1})
    return recs


def test_reward_model_learns_a_toy_preference(tok, lm):
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    rm = reward_model_from_lm(lm, tok)
    history = train_reward_model(rm, tok, _toy(64, 0, 0), steps=30, lr=3e-3, batch_size=8, print_fn=lambda s: None)
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    held = _toy(40, 500, 1)
    ra = rm.score([r["prompt"] for r in held], [r["response_a"] for r in held])
    rb = rm.score([r["prompt"] for r in held], [r["response_b"] for r in held])
    acc = ((ra > rb) == torch.tensor([r["p_a"] > 0.5 for r in held])).float().mean().item()
    assert acc > 0.9
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())   # the policy is untouched
    head_only = reward_model_from_lm(lm, tok, freeze_backbone=True)
    train_reward_model(head_only, tok, _toy(8, 0, 0), steps=2, lr=1e-2, batch_size=4, print_fn=lambda s: None)
    assert all(torch.equal(v, head_only.backbone.state_dict()[k]) for k, v in before.items())
    assert head_only.head.weight.abs().sum() > 0                       # only the head trained
