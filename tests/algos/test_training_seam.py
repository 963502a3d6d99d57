"""The model → loss seam: sequence log-probs, chat encoding, SFT, the preference step and the loop."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from elleci.algos import dpo_loss, una_binary_loss
from elleci.algos.chat import collate, encode_conversation, encode_prompt_response
from elleci.algos.logprobs import concatenated_logprobs, sequence_logprobs
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import (collate_fn, encode_feedback, encode_pairs, feedback_step, pairwise_step,
                                     precompute_reference)
from elleci.algos.sft import encode_sft, sft_collate, sft_loss, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"{a} + {b} = {a + b} Answer: {a + b} ciao mondo hello world" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300)


def _model(vocab=300, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=vocab)).to(dtype).eval()


def _log_softmax_reference(model, ids, labels):
    logp = F.log_softmax(model(ids).double(), -1)[:, :-1]
    tgt = labels[:, 1:]
    tok = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
    return tok, (tgt != -100)


def test_sequence_logprobs_equals_log_softmax_gather():
    m = _model(dtype=torch.float64)
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    tok, mask = _log_softmax_reference(m, ids, labels)
    assert torch.allclose(sequence_logprobs(m, ids, labels, token_reduction="none").double(), tok, atol=1e-6)
    assert torch.allclose(sequence_logprobs(m, ids, labels).double(), tok.sum(-1), atol=1e-5)
    assert torch.allclose(sequence_logprobs(m, ids, labels, token_reduction="mean").double(), tok.sum(-1) / mask.sum(-1),
                          atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprobs(m, ids, labels, token_reduction="avg")


def test_concatenated_equals_separate_calls():
    m = _model(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    c, r = torch.randint(2, 300, (2, 9), generator=g), torch.randint(2, 300, (2, 6), generator=g)
    cl, rl = c.clone(), r.clone()
    cl[:, :3] = rl[:, :3] = -100
    pc, pr = concatenated_logprobs(m, c, cl, r, rl, pad_token_id=1)
    assert torch.allclose(pc, sequence_logprobs(m, c, cl), atol=1e-9)
    assert torch.allclose(pr, sequence_logprobs(m, r, rl), atol=1e-9)   # right padding changes nothing


def test_encode_prompt_response_masks_the_prompt(tok):
    ids, labels = encode_prompt_response(tok, "3 + 4 = ?", "3 + 4 = 7 Answer: 7")
    prompt = tok.apply_chat_template([{"role": "user", "content": "3 + 4 = ?"}], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tok.im_end_id
    assert tok.decode(ids[len(prompt):-1]).strip() == "3 + 4 = 7 Answer: 7"
    short = encode_prompt_response(tok, "3 + 4 = ?", "3 + 4 = 7 Answer: 7", max_len=len(prompt) + 2)
    assert len(short[0]) == len(prompt) + 2
    with pytest.raises(ValueError, match="no room"):
        encode_prompt_response(tok, "3 + 4 = ?", "x", max_len=len(prompt))


def test_conversation_gives_one_example_per_assistant_turn(tok):
    conv = [{"role": "user", "content": "ciao"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "1 + 1 = ?"}, {"role": "assistant", "content": "Answer: 2"}]
    exs = encode_conversation(tok, conv)
    assert len(exs) == 2
    second_prompt = tok.apply_chat_template(conv[:3], add_generation_prompt=True)
    assert exs[1][0][: len(second_prompt)] == second_prompt
    assert sum(t != -100 for t in exs[1][1]) == len(tok.encode("Answer: 2")) + 1
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_conversation(tok, conv[:1])


def test_collate_pads_right():
    ids, labels = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_token_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="2 ids but 1 labels"):
        collate([([1, 2], [1])], 0)


def test_sft_loss_golden_and_model_cross_entropy(tok):
    tl = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.125, 1.0, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, metrics = sft_loss(tl, mask)
    assert math.isclose(loss.item(), (math.log(2) + math.log(4) + math.log(8)) / 3, rel_tol=1e-6)
    assert metrics["sft/tokens"].item() == 3
    m = _model()
    ids, labels = collate(encode_sft(tok, [[{"role": "user", "content": "2 + 2 = ?"},
                                           {"role": "assistant", "content": "Answer: 4"}]]), tok.pad_id)
    loss, _ = sft_step(m, (ids, labels))
    ref = F.cross_entropy(m(ids)[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-5)


def _pair_items(tok):
    pairs = [{"prompt": f"{a} + {a} = ?", "chosen": f"Answer: {2 * a}", "rejected": f"Answer: {2 * a + 1}"}
             for a in range(6)]
    return encode_pairs(tok, pairs)


def test_dpo_step_is_log2_at_the_reference_for_every_reference_kind(tok):
    m = _model()
    items = precompute_reference(m, _pair_items(tok), pad_token_id=tok.pad_id)
    batch = collate_fn("pairs", tok.pad_id)(items)
    frozen = copy.deepcopy(m)
    apply_lora(m, LoraConfig(r=2, target_modules=["attn.w_q"]))          # B = 0: policy == reference
    for ref in ("precomputed", "adapters", frozen):
        loss, metrics = pairwise_step(dpo_loss, reference=ref, beta=0.1)(m, batch)
        assert math.isclose(loss.item(), math.log(2), abs_tol=1e-5), ref
        assert abs(metrics["rewards/margin"].item()) < 1e-5
    with pytest.raises(ValueError, match="precompute_reference"):
        pairwise_step(dpo_loss)(m, collate_fn("pairs", tok.pad_id)(_pair_items(tok)))
    with pytest.raises(ValueError, match="unknown reference"):
        pairwise_step(dpo_loss, reference="sft")(m, batch)


def test_una_binary_step_is_quarter_at_the_reference(tok):
    m = _model()
    recs = [{"prompt": "1 + 1 = ?", "completion": "Answer: 2", "label": 1},
            {"prompt": "1 + 1 = ?", "completion": "Answer: 3", "label": 0}]
    items = precompute_reference(m, encode_feedback(tok, recs, "label"), pad_token_id=tok.pad_id)
    loss, _ = feedback_step(una_binary_loss, beta=0.5, kind="mse")(m, collate_fn("feedback", tok.pad_id)(items))
    assert math.isclose(loss.item(), 0.25, abs_tol=1e-6)


def test_loops_learn(tok):
    m = _model()
    examples = encode_sft(tok, [[{"role": "user", "content": f"{a} + 1 = ?"},
                                 {"role": "assistant", "content": f"Answer: {a + 1}"}] for a in range(4)])
    hist = train_loop(m, sample_batches(examples, 4, 0, sft_collate(tok.pad_id)), sft_step, steps=25, lr=3e-3,
                      log_every=5, print_fn=None)
    assert hist[-1]["sft/nll"] < 0.5 * hist[0]["sft/nll"]
    items = precompute_reference(m, _pair_items(tok), pad_token_id=tok.pad_id)
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    hist = train_loop(m, sample_batches(items, 6, 0, collate_fn("pairs", tok.pad_id)),
                      pairwise_step(dpo_loss, beta=0.1), steps=15, lr=1e-2, log_every=5, print_fn=None)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert hist[-1]["rewards/margin"] > 0.5 and hist[-1]["rewards/accuracy"] == 1.0


def test_nll_weight_adds_the_chosen_per_token_nll(tok):
    m = _model()
    items = precompute_reference(m, _pair_items(tok), pad_token_id=tok.pad_id)
    batch = collate_fn("pairs", tok.pad_id)(items)
    loss, metrics = pairwise_step(dpo_loss, beta=0.1, nll_weight=0.5)(m, batch)
    tok_c = sequence_logprobs(m, batch["chosen_ids"], batch["chosen_labels"], token_reduction="mean")
    nll = -tok_c.mean()
    assert torch.allclose(metrics["nll/chosen"], nll, atol=1e-5)
    assert math.isclose(loss.item(), math.log(2) + 0.5 * nll.item(), rel_tol=1e-5)
    recs = [{"prompt": "1 + 1 = ?", "completion": "Answer: 2", "label": 1},
            {"prompt": "1 + 1 = ?", "completion": "Answer: 3", "label": 0}]
    fb = precompute_reference(m, encode_feedback(tok, recs, "label"), pad_token_id=tok.pad_id)
    b = collate_fn("feedback", tok.pad_id)(fb)
    loss, metrics = feedback_step(una_binary_loss, beta=0.5, nll_weight=2.0)(m, b)
    desired = -sequence_logprobs(m, b["ids"][:1], b["labels"][:1], token_reduction="mean")[0]
    assert torch.allclose(metrics["nll/desired"], desired, atol=1e-5)          # only the label-1 response
    assert math.isclose(loss.item(), 0.25 + 2.0 * desired.item(), rel_tol=1e-5)


def test_preference_module_docstring_example_runs(tok):
    """The usage lines at the top of elleci.algos.preference run as written (signatures match)."""
    import textwrap

    import elleci.algos.preference as pref
    from elleci.algos import dpo_loss
    from elleci.algos.loop import sample_batches, train_loop
    doc = pref.__doc__.split("\n\n")[1]
    code = textwrap.dedent(doc).replace("steps=100", "steps=1")
    pairs = [{"prompt": "1 + 2 = ?", "chosen": "Answer: 3", "rejected": "Answer: 4"}] * 2
    env = {"tok": tok, "pairs": pairs, "model": _model(), "dpo_loss": dpo_loss, "sample_batches": sample_batches,
           "train_loop": lambda *a, **k: train_loop(*a, **{**k, "print_fn": None}),
           **{n: getattr(pref, n) for n in ("encode_pairs", "precompute_reference", "pairwise_step", "collate_fn")}}
    exec(code, env)
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(env["items"][0])
