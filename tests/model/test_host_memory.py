"""elleci.model.host_memory: the heap trim around checkpointed blocks on the CPU."""
import ctypes.util
import sys

import pytest
import torch

from elleci.model import ElleciConfig, ElleciLM, host_memory


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids).double().logsumexp(-1).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trims_every_nth_block_in_forward_and_recompute_and_changes_nothing(monkeypatch):
    calls, real_trim = [], host_memory.trim_host_memory
    monkeypatch.setattr(host_memory, "trim_host_memory", lambda: calls.append(1) or real_trim())   # counted, real
    torch.manual_seed(0)
    config = ElleciConfig.from_name("tiny", gradient_checkpointing=True)
    model = ElleciLM(config, dtype=torch.float64).train()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    monkeypatch.setattr(host_memory, "TRIM_EVERY", 0)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert calls == []
    monkeypatch.setattr(host_memory, "TRIM_EVERY", 2)
    loss, grads = _loss_and_grads(model, ids)
    trimmed_blocks = len(range(0, config.n_layers, 2))
    assert len(calls) == 2 * trimmed_blocks                 # once in the forward, once in the recompute
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    calls.clear()
    with torch.no_grad():
        model.eval()(ids)                                   # no checkpointing: no trim
    assert calls == []


def test_only_the_cpu_is_trimmed_and_only_when_asked(monkeypatch):
    fn = lambda: None                                       # noqa: E731
    assert host_memory.TRIM_EVERY == 0 and host_memory.trimming(fn, 0, "cpu") is fn      # off by default
    monkeypatch.setattr(host_memory, "TRIM_EVERY", 4)
    assert host_memory.trimming(fn, 0, "cuda") is fn and host_memory.trimming(fn, 1, "cpu") is fn
    assert host_memory.trimming(fn, 0, "cpu") is not fn


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc.so" not in str(ctypes.util.find_library("c")),
                    reason="glibc malloc_trim")
def test_trim_runs_on_glibc():
    assert host_memory.trim_host_memory() is True
