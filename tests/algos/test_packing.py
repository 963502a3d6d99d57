"""Packing SFT examples (first-fit decreasing, `seq_idx`): the bins, the collated rows, and losses equal to the
padded batch's in float64."""
import random

import pytest
import torch

from elleci.algos.chat import collate
from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.packing import (collate_packed, ffd_bins, pack_and_collate, pack_examples, packed_collate,
                                  packed_sequence_logprobs)
from elleci.algos.sft import sft_step
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.documents import document_positions


def examples(shapes, seed=0):
    """(ids, labels) with `p` prompt tokens (labels -100) and `r` response tokens, per (p, r)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, r in shapes:
        ids = torch.randint(4, 512, (p + r,), generator=g).tolist()
        out.append((ids, [IGNORE_INDEX] * p + ids[p:]))
    return out


def naive_ffd(lengths, cap):
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((k for k, f in enumerate(free) if f >= lengths[i]), None)
        if b is None:
            bins.append([]), free.append(cap)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def test_ffd_golden_by_hand():
    # longest first: 8 -> bin 0 (2 left); 6 -> bin 1 (4 left); 5 -> bin 2 (5 left); 4 -> bin 1 (0 left);
    # 3 -> bin 2 (2 left); 2 -> bin 0 (0 left)
    assert ffd_bins([5, 3, 8, 2, 6, 4], 10) == [[2, 3], [4, 5], [0, 1]]
    assert ffd_bins([], 10) == []
    assert ffd_bins([10, 10], 10) == [[0], [1]]


def test_ffd_equals_the_naive_first_fit_decreasing():
    rng = random.Random(0)
    for n, cap in ((1, 7), (50, 64), (300, 512), (257, 100)):
        lengths = [rng.randint(1, cap) for _ in range(n)]
        bins = ffd_bins(lengths, cap)
        assert bins == naive_ffd(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(n))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)


def test_ffd_bad_input_raises():
    with pytest.raises(ValueError, match="example 1 has 11 tokens"):
        ffd_bins([3, 11], 10)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        ffd_bins([0], 10)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        ffd_bins([1], 0)


def test_collate_packed_golden():
    exs = [([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9]), ([10, 11, 12, 13], [-100, -100, 12, 13])]
    batch = collate_packed([[exs[0], exs[1]], [exs[2]]], pad_token_id=1, max_length=6)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 1], [10, 11, 12, 13, 1, 1]]
    assert batch.labels.tolist() == [[-100, 6, 7, -100, 9, -100], [-100, -100, 12, 13, -100, -100]]
    assert batch.seq_idx.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]] and batch.seq_idx.dtype == torch.int32
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert torch.equal(batch.position_ids, document_positions(batch.seq_idx))
    assert batch.doc_index.tolist() == [[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]]
    ids, labels = batch[:2]                                      # a tuple, like a padded (ids, labels) batch
    assert ids is batch.input_ids and labels is batch.labels
    assert torch.equal(packed_collate(1, 6)([[exs[0], exs[1]], [exs[2]]]).labels, batch.labels)
    with pytest.raises(ValueError, match="more than max_length"):
        collate_packed([exs], pad_token_id=1, max_length=6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", layer_pattern="MMMA", mamba_input_gate=True,
                                           mla_latent_gate=True, chunk_size=4)).double()


SHAPES = [(5, 9), (3, 2), (8, 14), (2, 1), (6, 5), (4, 12), (7, 3)]


def test_packed_logprobs_equal_each_example_alone(model):
    """Sums (means) of each example's token log-probs. The log-prob kernel returns fp32 per token whatever
    the model's dtype, and the two sides add them in different orders: 1e-6 relative (the hidden states
    themselves agree to 1e-10: tests/model/test_packed_documents.py)."""
    exs = examples(SHAPES)
    bins = ffd_bins([len(i) for i, _ in exs], 24)
    assert len(bins) < len(exs)                                      # several examples share a row
    batch = collate_packed([[exs[i] for i in b] for b in bins], pad_token_id=1, max_length=24)
    order = [i for b in bins for i in b]                              # doc_index order -> example index
    with torch.no_grad():
        for reduction in ("sum", "mean"):
            got = packed_sequence_logprobs(model, batch, token_reduction=reduction)
            for k, i in enumerate(order):
                ids, labels = (torch.tensor([t]) for t in exs[i])
                want = sequence_logprobs(model, ids, labels, token_reduction=reduction)[0]
                torch.testing.assert_close(got[k], want, rtol=1e-6, atol=0)


def test_packed_sft_step_equals_the_padded_one_loss_and_gradients(model):
    """The token-mean NLL of the batch and its gradient, packed (4 rows of 24) vs padded (7 rows). The loss is
    a sum of fp32 token log-probs (the kernel's output dtype): 1e-6 relative. Gradients: 1e-10 relative,
    except two that are fp32 sums over tokens by design, 1e-6: lm_head's (the log-prob kernel accumulates
    it in fp32, DESIGN §4) and BitLinear's internal norm weights (tests/model/test_packed_documents.py)."""
    exs = examples(SHAPES, seed=1)
    padded, packed = collate(exs, pad_token_id=1), pack_and_collate(exs, pad_token_id=1, max_length=24)
    assert int((packed.labels != IGNORE_INDEX).sum()) == int((padded[1][:, 1:] != IGNORE_INDEX).sum())
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, metrics = sft_step(model, batch)
        loss.backward()
        results.append((loss.detach(), metrics["sft/tokens"], {n: p.grad.clone() for n, p in model.named_parameters()
                                                               if p.grad is not None}))
    (l1, n1, g1), (l2, n2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    assert int(n1) == int(n2)
    for n in g1:
        tol = 1e-6 if n.endswith("rms_norm.weight") or n == "lm_head.weight" else 1e-10
        torch.testing.assert_close(g2[n], g1[n], rtol=0, atol=tol * max(1.0, g1[n].abs().max().item()), msg=n)


def test_pack_examples_keeps_every_example_once():
    exs = examples([(2, 3)] * 9 + [(10, 10)], seed=2)
    bins = pack_examples(exs, 20)
    assert sorted(map(id, (e for b in bins for e in b))) == sorted(map(id, exs))
    assert [sum(len(i) for i, _ in b) for b in bins] == [20, 20, 20, 5]          # the 20, then 4 + 4 + 1 fives
