"""GRPO's update in micro-batches (`grpo_step.grpo_backward`): the full batch's loss, metrics and gradient."""
import pytest
import torch

from elleci.algos.logprobs import IGNORE_INDEX, sequence_logprobs
from elleci.algos.reasoning.grpo import GRPOConfig, aggregator, grpo_loss
from elleci.algos.reasoning.grpo_step import aggregation_weights, grpo_backward, micro_batched_logps, row_micro_batches
from elleci.model import ElleciConfig, ElleciLM

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo")


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregation_weights_reproduce_the_aggregations(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) < 0.6
    mask[2] = False                                                     # a row with no token
    w = aggregation_weights(mask, name, max_completion_len=12, dtype=torch.float64)
    torch.testing.assert_close((w * x).sum(), aggregator(name, 12)(x, mask), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="aggregation"):
        aggregation_weights(mask, "dapo")


def batch(seed=0, N=7, P=5, max_new=6):
    """Right-padded prompt + completion rows with labels on the completions only, lengths varying."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for n in range(N):
        p, c = P - n % 3, 1 + (n * 5) % max_new
        ids = torch.randint(4, 512, (p + c,), generator=g)
        rows.append(ids)
        labels.append(torch.cat([torch.full((p,), IGNORE_INDEX), ids[p:]]))
    L = max(map(len, rows))
    ids = torch.stack([torch.nn.functional.pad(r, (0, L - len(r)), value=1) for r in rows])
    lab = torch.stack([torch.nn.functional.pad(r, (0, L - len(r)), value=IGNORE_INDEX) for r in labels])
    return ids, lab


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", layer_pattern="MMMA", mamba_input_gate=True)).double()


@pytest.mark.parametrize("name, process, mu2", [("grpo", False, False), ("bnpo", True, True),
                                                ("dr_grpo", False, True)])
def test_micro_batched_backward_equals_one_backward(model, name, process, mu2):
    """Loss, metrics and every gradient against one backward over the batch (β ≠ 0 with a reference;
    μ > 1 style old log-probs so that the ratio and the clipping are not trivial). Log-probs are fp32 per
    token (the kernel's output), and the weights w are fp32: 1e-6 relative."""
    ids, labels = batch()
    mask = labels[:, 1:] != IGNORE_INDEX
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(mask.shape if process else mask.shape[:1], generator=g)
    with torch.no_grad():
        now = sequence_logprobs(model, ids, labels, token_reduction="none")
    ref = now + 0.1 * torch.randn(now.shape, generator=g)
    old = (now + 0.3 * torch.randn(now.shape, generator=g)) if mu2 else None
    kw = dict(epsilon=0.2, beta=0.04)

    model.zero_grad()
    logps = sequence_logprobs(model, ids, labels, token_reduction="none")
    want_loss, want_metrics = grpo_loss(logps, logps.detach() if old is None else old, adv, mask, ref_logps=ref,
                                        aggregate=aggregator(name, 6), **kw)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    loss, metrics, got_logps = grpo_backward(model, ids, labels, adv, micro_batch_size=3, old_logps=old,
                                             ref_logps=ref, aggregation=name, max_completion_len=6, **kw)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-6, atol=1e-7)
    for k, v in want_metrics.items():
        torch.testing.assert_close(metrics[k], v, rtol=1e-6, atol=1e-7, msg=k)
    torch.testing.assert_close(got_logps * mask, logps.detach() * mask, rtol=0, atol=1e-6)
    for n, gr in want.items():
        scale = max(1e-3, gr.abs().max().item())
        torch.testing.assert_close(model.get_parameter(n).grad, gr, rtol=0, atol=1e-6 * scale, msg=n)
    assert metrics["grpo/clip_ratio"] > 0 if mu2 else metrics["grpo/clip_ratio"] == 0


def test_micro_batches_are_cut_to_their_longest_row():
    ids, labels = batch()
    cuts = row_micro_batches(labels, 3)
    assert [(r.start, r.stop) for r, _ in cuts] == [(0, 3), (3, 6), (6, 7)]
    for rows, L in cuts:
        assert (labels[rows, L:] == IGNORE_INDEX).all() and (labels[rows, L - 1] != IGNORE_INDEX).any()
    calls = []
    out = micro_batched_logps(lambda i, lab: calls.append(i.shape) or torch.ones(i.shape[0], i.shape[1] - 1),
                              ids, labels, 3)
    assert out.shape == (7, labels.shape[1] - 1) and calls == [(3, L) for _, L in cuts[:2]] + [(1, cuts[2][1])]
    with pytest.raises(ValueError, match="micro_batch_size"):
        row_micro_batches(labels, 0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GRPOConfig(micro_batch_size=0)
