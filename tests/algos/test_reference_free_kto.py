"""SimPO, ORPO and KTO against values derived by hand and limiting cases, and the steps that train them:
pairwise_step with reference="none" (no reference pass) and feedback_step with KTO's KL baseline through
the binary-feedback reader."""
import json
import math

import pytest
import torch

from elleci.algos import dpo_loss, kl_baseline, kto_loss, orpo_loss, read_binary, simpo_loss, una_binary_loss
from elleci.algos import preference
from elleci.algos.alignment.reference_free import log_odds
from elleci.algos.chat import encode_prompt_response
from elleci.algos.logprobs import sequence_logprobs
from elleci.algos.preference import (collate_fn, encode_feedback, encode_pairs, feedback_step, pairwise_step,
                                     precompute_reference)
from elleci.model import ElleciConfig, ElleciLM, Tokenizer

D = torch.float64
sig = lambda x: 1 / (1 + math.exp(-x))                                          # noqa: E731


def t(*v):
    return torch.tensor(v, dtype=D)


# ----------------------------------------------------------------------------- SimPO

def test_simpo_by_hand():
    loss, m = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)))           # −log σ(2·1 − 0.5)
    assert m["rewards/chosen"].item() == pytest.approx(-2.0) and m["rewards/rejected"].item() == pytest.approx(-4.0)
    assert m["rewards/margins"].item() == pytest.approx(2.0) == m["rewards/margin"].item()
    assert m["rewards/accuracies"].item() == 1.0 and m["logps/chosen"].item() == -1.0
    for gamma in (0.0, 0.5, 1.6):                                                # ℓw = ℓl: log(1 + e^γ)
        assert simpo_loss(t(-1.3), t(-1.3), gamma=gamma)[0].item() == pytest.approx(math.log(1 + math.exp(gamma)))


def test_simpo_at_equal_lengths_and_gamma_zero_is_dpo_with_beta_over_length():
    # ℓ = S / L for both completions ⇒ β(ℓw − ℓl) = (β/L)(Sw − Sl): DPO with β/L on the sums and a reference that
    # scores both completions alike (rc = rr), in value and in gradient
    L, beta = 7, 2.0
    sw, sl = t(-9.0, -3.5, -12.0).requires_grad_(True), t(-11.0, -4.0, -6.0).requires_grad_(True)
    simpo, _ = simpo_loss(sw / L, sl / L, beta=beta, gamma=0.0)
    simpo.backward()
    g_simpo = (sw.grad.clone(), sl.grad.clone())
    sw.grad = sl.grad = None
    ref = t(-5.0, -2.0, -8.0)
    dpo, _ = dpo_loss(sw, sl, ref, ref, beta=beta / L)
    dpo.backward()
    assert simpo.item() == pytest.approx(dpo.item(), rel=1e-12)
    assert torch.allclose(g_simpo[0], sw.grad, rtol=1e-12) and torch.allclose(g_simpo[1], sl.grad, rtol=1e-12)
    assert simpo_loss(t(-1.0), t(-1.0), gamma=0.3)[0].item() > simpo_loss(t(-1.0), t(-1.0), gamma=0.0)[0].item()


def test_simpo_bad_input():
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(t(-1.0), t(-2.0), beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        simpo_loss(t(-1.0), t(-2.0, -1.0))
    assert simpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), reduction="none")[0].shape == (2,)


# ----------------------------------------------------------------------------- ORPO

def test_orpo_odds_ratio_by_hand():
    # P(yw) = 0.5 → odds 1; P(yl) = 0.2 → odds 0.25; odds ratio 4: L_OR = −log σ(log 4) = −log(4/5)
    loss, m = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    assert m["orpo/log_odds_chosen"].item() == pytest.approx(math.log(4.0))
    assert m["orpo/log_odds_ratio"].item() == pytest.approx(math.log(0.8))
    assert m["orpo/nll"].item() == pytest.approx(math.log(2.0))
    assert loss.item() == pytest.approx(math.log(2.0) - 0.1 * math.log(0.8))   # NLL + λ L_OR
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5))     # TRL: β ℓ
    assert orpo_loss(t(-0.7), t(-0.3), beta=0.0)[0].item() == pytest.approx(0.7)  # λ = 0: the chosen NLL only


def test_orpo_log_odds_are_stable_and_push_the_right_way():
    x = t(-1e-4, -0.3, -0.69, -0.7, -2.0, -40.0)
    direct = x - torch.log(1 - torch.exp(x))                                     # fine in float64 at these values
    assert torch.allclose(log_odds(x), direct, rtol=1e-10)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-12]))).all()           # P = 1 capped, not inf
    lw, ll = t(-0.5).requires_grad_(True), t(-0.6).requires_grad_(True)
    orpo_loss(lw, ll, beta=0.1)[0].backward()
    assert lw.grad.item() < 0 and ll.grad.item() > 0                            # descent raises ℓw, lowers ℓl


# ----------------------------------------------------------------------------- KTO

def test_kl_baseline_by_hand():
    pol, ref = t(-1.0, -2.0).requires_grad_(True), t(-1.5, -2.1)
    z0 = kl_baseline(pol, ref)
    assert z0.item() == pytest.approx((0.5 + 0.1) / 2) and not z0.requires_grad  # mean log-ratio, detached
    assert kl_baseline(t(-2.0, -2.0), t(-1.0, -1.5)).item() == 0.0              # negative mean clamped to 0


def test_kto_by_hand():
    pol, ref = t(-1.0, -3.0), t(-1.5, -2.8)                                      # r = 0.5 (desirable), −0.2
    kl_pol, kl_ref = t(-4.0, -5.0), t(-4.2, -5.4)                                # z0 = (0.2 + 0.4)/2 = 0.3
    loss, m = kto_loss(pol, ref, torch.tensor([1, 0]), kl_policy_logps=kl_pol, kl_ref_logps=kl_ref, beta=0.1,
                       desirable_weight=1.0, undesirable_weight=1.5, reduction="none")
    assert loss[0].item() == pytest.approx(1 - sig(0.1 * (0.5 - 0.3)))          # λ_D (1 − σ(β(r − z0)))
    assert loss[1].item() == pytest.approx(1.5 * (1 - sig(0.1 * (0.3 + 0.2))))  # λ_U (1 − σ(β(z0 − r)))
    assert m["kto/kl"].item() == pytest.approx(0.3)
    assert m["rewards/chosen"].item() == pytest.approx(0.05) and m["rewards/rejected"].item() == pytest.approx(-0.02)
    assert m["rewards/margins"].item() == pytest.approx(0.07) and m["logps/rejected"].item() == -3.0


def test_kto_limits_and_gradients():
    pol = t(-1.0, -2.0, -3.0).requires_grad_(True)
    kl_pol = t(-2.0, -2.0, -2.0).requires_grad_(True)
    labels = torch.tensor([True, False, True])
    loss, m = kto_loss(pol, pol.detach(), labels, kl_policy_logps=kl_pol, kl_ref_logps=kl_pol.detach())
    assert loss.item() == pytest.approx(0.5)                                     # π = π_ref, z0 = 0: λ/2 each
    loss.backward()
    assert kl_pol.grad is None or torch.equal(kl_pol.grad, torch.zeros(3))      # z0 carries no gradient
    assert pol.grad[0] < 0 and pol.grad[1] > 0                                   # raise desirable, lower undesirable
    only = kto_loss(t(-1.0), t(-1.0), [1], kl_policy_logps=t(-1.0), kl_ref_logps=t(-1.0))[1]
    assert "rewards/rejected" not in only and "rewards/margins" not in only     # no class, no NaN
    with pytest.raises(ValueError, match="kl_baseline=True"):
        kto_loss(t(-1.0), t(-1.0), [1])
    with pytest.raises(ValueError, match="labels"):
        kto_loss(t(-1.0), t(-1.0), [2], kl_policy_logps=t(-1.0), kl_ref_logps=t(-1.0))


# ----------------------------------------------------------------------------- the steps

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"{a} + {b} = {a + b} Answer: {a + b} ciao mondo hello world" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300)


def _model(seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300)).eval()


PAIRS = [{"prompt": "2 + 3 =", "chosen": "5 Answer: 5", "rejected": "6 Answer: 6 ciao"},
         {"prompt": "4 + 4 =", "chosen": "8", "rejected": "9 hello world"}]
FEEDBACK = [{"prompt": "2 + 3 =", "completion": "5 Answer: 5", "label": True},
            {"prompt": "4 + 4 =", "completion": "9 hello", "label": False},
            {"prompt": "1 + 1 =", "completion": "2", "label": 1}]


def test_reference_free_step_runs_no_reference(tok, monkeypatch):
    monkeypatch.setattr(preference, "resolve_reference", lambda *a, **k: pytest.fail("a reference was resolved"))
    model = _model()
    batch = collate_fn("pairs", tok.pad_id)(encode_pairs(tok, PAIRS))
    for loss_fn, kw in ((simpo_loss, {"beta": 2.0, "gamma": 0.5}), (orpo_loss, {"beta": 0.1})):
        loss, m = pairwise_step(loss_fn, reference="none", token_reduction="mean", **kw)(model, batch)
        pc = sequence_logprobs(model, batch["chosen_ids"], batch["chosen_labels"], token_reduction="mean")
        pr = sequence_logprobs(model, batch["rejected_ids"], batch["rejected_labels"], token_reduction="mean")
        assert loss.item() == pytest.approx(loss_fn(pc, pr, **kw)[0].item(), rel=1e-5)
        assert "rewards/margins" in m
    with pytest.raises(ValueError, match="dpo_loss needs reference"):
        pairwise_step(dpo_loss, reference="none")


def test_kl_pairs_pair_each_prompt_with_the_previous_completion(tok):
    items = encode_feedback(tok, FEEDBACK, "label", kl_pairs=True)
    for i, item in enumerate(items):
        assert item["kl_response"] == encode_prompt_response(tok, FEEDBACK[i]["prompt"], FEEDBACK[i - 1]["completion"])
    assert "kl_response" not in encode_feedback(tok, FEEDBACK, "label")[0]
    with pytest.raises(ValueError, match="at least 2"):
        encode_feedback(tok, FEEDBACK[:1], "label", kl_pairs=True)


def test_kto_through_the_binary_reader_precomputed_and_frozen(tok, tmp_path):
    path = tmp_path / "fb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in FEEDBACK))
    records = read_binary(path)
    model = _model()
    items = precompute_reference(model, encode_feedback(tok, records, "label", kl_pairs=True), pad_token_id=tok.pad_id)
    assert all("ref_kl_logps" in it and it["ref_kl_logps"] < 0 for it in items)
    batch = collate_fn("feedback", tok.pad_id)(items)
    for reference in ("precomputed", "frozen"):
        loss, m = feedback_step(kto_loss, kl_baseline=True, reference=reference, beta=0.1)(model, batch)
        assert loss.item() == pytest.approx(0.5, abs=1e-5) and m["kto/kl"].item() == pytest.approx(0.0, abs=1e-5)
    # after the policy moves, z0 is the mean policy − reference log-ratio on the mismatched pairs (clamped at 0)
    moved = _model(seed=1)
    loss, m = feedback_step(kto_loss, kl_baseline=True, reference="precomputed", beta=0.1)(moved, batch)
    kl_pol = sequence_logprobs(moved, batch["kl_ids"], batch["kl_labels"])
    assert m["kto/kl"].item() == pytest.approx(max(0.0, (kl_pol - batch["ref_kl_logps"]).mean().item()), abs=1e-5)
    with pytest.raises(ValueError, match="kl_baseline=True"):
        feedback_step(kto_loss, reference="precomputed")(model, batch)
    plain = collate_fn("feedback", tok.pad_id)(encode_feedback(tok, records, "label"))
    with pytest.raises(ValueError, match="kl_pairs=True"):
        feedback_step(kto_loss, kl_baseline=True, reference="frozen")(model, plain)
    assert math.isfinite(feedback_step(una_binary_loss, reference="frozen")(model, plain)[0].item())   # UNA unchanged
