"""`train_loop` runs on the Trainer and computes what the former bare loop computed: the same weights after
SFT and LoRA-DPO runs (float64, the same ops in the same order), the same losses, and jsonl records."""
import copy
import json
import random

import pytest
import torch

from elleci.algos import dpo_loss
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import collate_fn, encode_pairs, pairwise_step, precompute_reference
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora
from elleci.train import make_optimizer, make_scheduler, optimizer_step


def _bare_loop(model, batch_fn, loss_fn, *, steps, lr, weight_decay=0.0, max_grad_norm=1.0):
    """The loop train_loop was before it ran on the Trainer (kept here as the reference)."""
    optimizer = make_optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 10)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=steps, warmup_steps=min(warmup, steps - 1))
    model.train()
    losses = []
    for step in range(steps):
        loss, _ = loss_fn(model, batch_fn(step))
        loss.backward()
        optimizer_step(model, optimizer, scheduler, max_grad_norm)
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"{a} + {b} = {a + b} Answer: {a + b} ciao mondo" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300)


def _model():
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300)).to(torch.float64).eval()


def _sft_examples(tok):
    rng = random.Random(0)
    convs = [[{"role": "user", "content": f"{a} + {b} = ?"},
              {"role": "assistant", "content": f"Answer: {a + b}" + " ciao" * rng.randint(0, 4)}]
             for a in range(4) for b in range(3)]
    return encode_sft(tok, convs)


def _assert_same_params(a, b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12, msg=na)


def test_sft_run_equals_the_bare_loop(tok, tmp_path):
    ex = _sft_examples(tok)
    batches = sample_batches(ex, 4, 0, sft_collate(tok.pad_id))
    old, new = _model(), _model()
    old_losses = _bare_loop(old, batches, sft_step, steps=6, lr=3e-3)
    hist = train_loop(new, batches, sft_step, steps=6, lr=3e-3, log_every=1, print_fn=None,
                      jsonl_path=tmp_path / "m.jsonl")
    _assert_same_params(old, new)
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in hist] == pytest.approx(old_losses, rel=1e-12)
    assert old_losses[-1] < old_losses[0]                         # it trained
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == pytest.approx(old_losses, rel=1e-12)


def test_lora_dpo_run_equals_the_bare_loop(tok):
    pairs = [{"prompt": f"{a} + 1 = ?", "chosen": f"Answer: {a + 1}", "rejected": f"Answer: {a + 2}"}
             for a in range(6)]
    base = _model()
    items = precompute_reference(base, encode_pairs(tok, pairs), pad_token_id=tok.pad_id)
    old, new = copy.deepcopy(base), copy.deepcopy(base)
    for m in (old, new):
        torch.manual_seed(1)
        apply_lora(m, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
        m.to(torch.float64)
    batches = sample_batches(items, 3, 0, collate_fn("pairs", tok.pad_id))
    step = pairwise_step(dpo_loss, beta=0.1)
    old_losses = _bare_loop(old, batches, step, steps=5, lr=1e-2)
    hist = train_loop(new, batches, step, steps=5, lr=1e-2, log_every=2, print_fn=None)
    _assert_same_params(old, new)
    assert [h["step"] for h in hist] == [1, 2, 4, 5]               # step 1, every log_every, the last
    assert [h["loss"] for h in hist] == pytest.approx([old_losses[i] for i in (0, 1, 3, 4)], rel=1e-12)
    assert "rewards/margins" in hist[-1] and "rewards/margin" in hist[-1]   # TRL's name beside ours


def test_train_loop_prints_a_line_per_logged_step(tok):
    lines = []
    train_loop(_model(), sample_batches(_sft_examples(tok), 2, 0, sft_collate(tok.pad_id)), sft_step, steps=3,
               lr=1e-3, log_every=2, print_fn=lines.append)
    assert [x.split(" | ")[0] for x in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all("loss" in x and "tok/s" in x for x in lines)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_loop(_model(), lambda s: None, sft_step, steps=0, lr=1e-3)
