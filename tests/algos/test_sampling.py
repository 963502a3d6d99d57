"""Sampling and next-token read-outs shared by the online methods (RLAIF, iterative DPO, RLAIF-V)."""
import pytest
import torch
import torch.nn.functional as F

from elleci.algos.sampling import (choice_probs, complete, next_token_logprobs, prompt_ids, sample_responses,
                                   single_token_ids)
from elleci.model import ElleciConfig, ElleciLM, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"{a} + {b} = {a + b} Answer: {a + b} yes no Response 1 2" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300, split_digits=True)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


def test_prompt_ids_chat_and_raw(tok):
    chat = prompt_ids(tok, ["3 + 4 = ?"])[0]
    assert chat == tok.apply_chat_template([{"role": "user", "content": "3 + 4 = ?"}], add_generation_prompt=True)
    assert prompt_ids(tok, ["3 + 4"], chat=False) == [tok.encode("3 + 4")]
    with pytest.raises(TypeError, match="string prompts"):
        prompt_ids(tok, [[{"role": "user", "content": "x"}]], chat=False)


def test_complete_greedy_matches_generate_per_prompt(model, tok):
    ids = prompt_ids(tok, ["1 + 2 = ?", "7 + 8 = ?"])
    texts = complete(model, tok, ids, max_new_tokens=6, batch_size=2)
    for p, text in zip(ids, texts):                                   # batched == each prompt alone
        out = model.generate([p], max_new_tokens=6, temperature=0.0, eos_token_id=[tok.im_end_id, tok.eos_id])
        row = out[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(row) if t in (tok.im_end_id, tok.eos_id)), len(row))
        assert text == tok.decode(row[:cut], skip_special_tokens=True)


def test_sample_responses_shape_seed_and_independence(model, tok):
    a = sample_responses(model, tok, ["1 + 2 = ?", "3 + 3 = ?"], k=3, max_new_tokens=8, seed=5)
    b = sample_responses(model, tok, ["1 + 2 = ?", "3 + 3 = ?"], k=3, max_new_tokens=8, seed=5)
    c = sample_responses(model, tok, ["1 + 2 = ?", "3 + 3 = ?"], k=3, max_new_tokens=8, seed=6)
    assert len(a) == 2 and all(len(g) == 3 for g in a)
    assert a == b and a != c
    assert len(set(a[0])) > 1                                         # an untrained model: distinct draws
    with pytest.raises(ValueError, match="temperature > 0"):
        sample_responses(model, tok, ["x"], k=2, temperature=0.0)


def test_next_token_logprobs_equals_full_forward(model, tok):
    ids = [tok.encode("1 + 2 = 3"), tok.encode("4"), tok.encode("Answer: 9 yes")]
    got = next_token_logprobs(model, ids, batch_size=2)               # right-padded batches of mixed lengths
    for row, p in zip(got, ids):
        want = F.log_softmax(model(torch.tensor([p])).double(), -1)[0, -1]
        torch.testing.assert_close(row.double(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="non-empty"):
        next_token_logprobs(model, [[]])


def test_choice_probs_renormalises_and_ignores_other_tokens():
    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), -1)
    p = choice_probs(logp, [[1], [2]])
    torch.testing.assert_close(p, torch.tensor([[1 / (1 + torch.e), torch.e / (1 + torch.e)]]))
    bumped = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 30.0]]), -1)     # unrelated token dominates
    torch.testing.assert_close(choice_probs(bumped, [[1], [2]]), p)
    both = choice_probs(logp, [[0, 1], [2]])                           # variants add up
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(both, torch.stack([e[:2].sum(), e[2]])[None] / e.sum())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        choice_probs(logp, [[1], [9]])


def test_single_token_ids(tok):
    ids = single_token_ids(tok, ["1", "1"])
    assert ids == [tok.encode("1")[0]]
    with pytest.raises(ValueError, match="single token"):
        single_token_ids(tok, ["12 + 34 Answer"])
