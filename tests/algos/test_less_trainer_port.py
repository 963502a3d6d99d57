"""LESS's warm-up (`warmup_lora`) on the one trainer (issue 19, point 7) against the loop it replaced, kept below
as `_old_warmup_lora` (the pre-port code, verbatim but for its name): float64 tiny model with a LoRA whose A and
B both start non-zero, 7 examples in batches of 3 (the last batch of each epoch smaller), warm-up and clipping
on. The same operations run in the same order, so the weights, Adam's moments, the mean LRs and the printed
lines must be equal, not close."""
import pytest
import torch

from elleci.algos.chat import collate
from elleci.algos.curation.less_grads import (_epoch_batches, _linear_schedule, _snapshot, lora_parameters,
                                              warmup_lora)
from elleci.algos.sft import sft_step
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora
from elleci.train import make_optimizer, optimizer_step

PAD = 0


def _old_warmup_lora(model, examples, *, epochs, batch_size, lr, pad_token_id, seed=0, betas=(0.9, 0.999), eps=1e-8,
                     warmup_ratio=0.03, max_grad_norm=1.0, log_every=10, print_fn=print):
    if epochs < 1 or batch_size < 1 or not examples:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and examples, got {epochs}, {batch_size}, {len(examples)}")
    lora_parameters(model)
    print_fn = print_fn or (lambda *_: None)
    optimizer = make_optimizer(model, lr, weight_decay=0.0, betas=betas, eps=eps)
    per_epoch = -(-len(examples) // batch_size)
    scheduler = _linear_schedule(optimizer, epochs * per_epoch, warmup_ratio)
    model.train()
    ckpts, step = [], 0
    for epoch in range(epochs):
        lrs = []
        for idx in _epoch_batches(len(examples), batch_size, seed, epoch):
            lrs.append(scheduler.get_last_lr()[0])
            loss, _ = sft_step(model, collate([examples[i] for i in idx], pad_token_id))
            loss.backward()
            norm = optimizer_step(model, optimizer, scheduler, max_grad_norm)
            if step % log_every == 0:
                print_fn(f"warmup step {step} | epoch {epoch} | loss {loss.item():.4f} | grad_norm {norm:.4f} | "
                         f"lr {lrs[-1]:.2e}")
            step += 1
        ckpts.append(_snapshot(model, optimizer, lrs, betas, eps, step))
        print_fn(f"warmup checkpoint {epoch} | step {step} | mean lr {ckpts[-1].lr:.3e}")
    model.eval()
    return ckpts


def _model():
    torch.manual_seed(0)
    m = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=64)).double()
    apply_lora(m, LoraConfig(r=2, lora_alpha=4.0, target_modules="all-linear", init_lora_weights=False))
    return m


def _examples(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 64, (5 + (i * 3) % 7,), generator=g).tolist()
        out.append((ids, [-100] * 3 + ids[3:]))
    return out


@pytest.mark.parametrize("max_grad_norm", [1e-3, None], ids=["clipped", "unclipped"])
def test_port_gives_the_same_checkpoints(max_grad_norm):
    ex = _examples(7, seed=1)
    kw = dict(epochs=2, batch_size=3, lr=1e-2, pad_token_id=PAD, seed=4, warmup_ratio=0.2, max_grad_norm=max_grad_norm,
              log_every=2)
    runs = []
    for fn in (_old_warmup_lora, warmup_lora):
        model, lines = _model(), []
        ckpts = fn(model, ex, **kw, print_fn=lines.append)
        runs.append((ckpts, lines, {n: p.detach().clone() for n, p in lora_parameters(model).items()}, model.training))
    (old, old_lines, old_p, old_mode), (new, new_lines, new_p, new_mode) = runs
    start = lora_parameters(_model())
    assert len(old) == len(new) == 2 and [c.step for c in new] == [3, 6]
    assert [c.lr for c in new] == [c.lr for c in old] and new[0].lr != new[1].lr
    for a, b in zip(old, new):
        assert a.betas == b.betas and a.eps == b.eps
        for n in start:
            assert torch.equal(a.lora[n], b.lora[n]) and torch.equal(a.exp_avg[n], b.exp_avg[n]), n
            assert torch.equal(a.exp_avg_sq[n], b.exp_avg_sq[n]), n
    assert all(torch.equal(old_p[n], new_p[n]) for n in start)
    assert any(not torch.equal(new[0].lora[n], start[n].detach()) for n in start)          # it trained
    assert any(not torch.equal(new[0].lora[n], new[1].lora[n]) for n in start)
    assert new_lines == old_lines and len(new_lines) == 2 + 3                # steps 0, 2, 4 and two checkpoints
    assert old_mode is new_mode is False
