import json
import math
import random

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from elleci.checkpointing import CheckpointError
from elleci.data import TokenBatches
from elleci.train import (MetricLogger, Throughput, accumulate_gradients, autocast, cosine_lr, constant_lr,
                          load_checkpoint, make_optimizer, make_scheduler, maybe_compile, optimizer_step,
                          param_groups, save_checkpoint, wsd_lr)

V = 29  # toy vocabulary


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Mixer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.in_proj = nn.Linear(d, d)
        self.A_log = nn.Parameter(torch.zeros(d))
        self.D = nn.Parameter(torch.ones(d))
        self.gate = nn.Parameter(torch.tensor(0.5))


class Toy(nn.Module):
    """Embedding -> dropout -> LayerNorm -> Linear head; dropout makes the loss depend on the RNG."""

    def __init__(self, d=16, p=0.2, tied=False):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.drop = nn.Dropout(p)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(self.drop(self.emb(x))))


def lm_loss(model, mb):
    x, y = mb
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


# ---------------------------------------------------------------------------------------------- optimizer

def test_param_groups_decay_split():
    model = nn.ModuleDict({"emb": nn.Embedding(V, 8), "ln": nn.LayerNorm(8), "rms": RMSNorm(8),
                           "mixer": Mixer(8), "out": nn.Linear(8, V), "frozen": nn.Linear(8, 8)})
    model["frozen"].requires_grad_(False)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    m = model
    assert ids(decay["params"]) == ids([m["mixer"].in_proj.weight, m["out"].weight])
    assert ids(no_decay["params"]) == ids([m["emb"].weight, m["ln"].weight, m["ln"].bias, m["rms"].weight,
                                           m["mixer"].in_proj.bias, m["mixer"].A_log, m["mixer"].D,
                                           m["mixer"].gate, m["out"].bias])
    # a head tied to the embedding is one parameter, in no-decay
    tied = Toy(tied=True)
    d, nd = param_groups(tied, 0.1)
    assert ids(d["params"]) == set() and id(tied.emb.weight) in ids(nd["params"])
    assert len(nd["params"]) == 3  # emb (= head), LayerNorm weight and bias


def test_make_optimizer_builds_adamw_groups():
    model = Toy()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 1e-3
    assert not opt.param_groups[0]["fused"]  # CPU


# ---------------------------------------------------------------------------------------------- schedules

def test_wsd_golden_values():
    kw = dict(total_steps=100, warmup_steps=10, decay_steps=20, min_ratio=0.1)
    assert wsd_lr(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert wsd_lr(9, **kw) == pytest.approx(1.0)  # end of warmup
    assert wsd_lr(50, **kw) == 1.0 and wsd_lr(80, **kw) == 1.0  # stable, decay starts at 100 - 20
    assert wsd_lr(85, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # cos(pi/4)
    assert wsd_lr(90, **kw) == pytest.approx(0.55)  # mid-decay: 0.1 + 0.9 / 2
    assert wsd_lr(100, **kw) == pytest.approx(0.1) and wsd_lr(500, **kw) == pytest.approx(0.1)
    assert wsd_lr(0, total_steps=10, warmup_steps=0, decay_steps=0) == 1.0


def test_cosine_and_constant_golden_values():
    kw = dict(total_steps=110, warmup_steps=10)
    assert cosine_lr(0, **kw) == pytest.approx(0.1)
    assert cosine_lr(9, **kw) == pytest.approx(1.0) and cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.5)
    assert cosine_lr(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(60, **kw, min_ratio=0.2) == pytest.approx(0.6)
    assert [constant_lr(s, warmup_steps=4) for s in (0, 3, 100)] == [0.25, 1.0, 1.0]


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="warmup_steps \\+ decay_steps <= total_steps"):
        wsd_lr(0, total_steps=100, warmup_steps=10, decay_steps=95)
    with pytest.raises(ValueError):
        cosine_lr(0, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError):
        wsd_lr(0, total_steps=10, warmup_steps=1, decay_steps=1, min_ratio=1.5)
    with pytest.raises(ValueError):
        wsd_lr(-1, total_steps=10, warmup_steps=1, decay_steps=1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):  # at construction, not when the decay is reached
        make_scheduler(opt, "wsd", total_steps=10, warmup_steps=5, decay_steps=6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_scheduler(opt, "linear")


def test_scheduler_counts_optimizer_steps():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    kw = dict(total_steps=12, warmup_steps=4, decay_steps=4)
    sched = make_scheduler(opt, "wsd", **kw)
    model = nn.Module()
    model.p = p
    used = []
    for k in range(12):
        for _ in range(3):  # three micro-batches must not advance the schedule
            accumulate_gradients(lambda mb: (p * mb).sum(), [1.0])
        used.append(opt.param_groups[0]["lr"])
        optimizer_step(model, opt, sched)
    assert used == pytest.approx([2.0 * wsd_lr(k, **kw) for k in range(12)])


# ---------------------------------------------------------------------------------------------- steps

def test_accumulation_matches_full_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    full = F.cross_entropy(model(x), y)
    full.backward()
    ref = [p.grad.clone() for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    mbs = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    loss, tokens = accumulate_gradients(lambda mb: F.cross_entropy(model(mb[0]), mb[1]), mbs)
    assert tokens is None and loss == pytest.approx(full.item(), abs=1e-6)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)

    # ragged micro-batches: token sums + normalizer = total tokens is still the exact mean
    model.zero_grad(set_to_none=True)
    ragged = [(x[:3], y[:3]), (x[3:], y[3:])]
    fn = lambda mb: (F.cross_entropy(model(mb[0]), mb[1], reduction="sum"), len(mb[1]))
    loss, tokens = accumulate_gradients(fn, ragged, normalizer=8)
    assert tokens == 8 and loss == pytest.approx(full.item(), abs=1e-6)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)


def test_optimizer_step_clips_steps_and_zeroes():
    p = nn.Parameter(torch.zeros(2))
    model = nn.Module()
    model.p = p
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, "constant")
    p.grad = torch.tensor([3.0, 4.0])
    norm = optimizer_step(model, opt, sched, max_grad_norm=1.0)
    assert norm == pytest.approx(5.0)  # the norm before clipping
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))  # update of the clipped grad
    assert p.grad is None and sched.last_epoch == 1
    p.grad = torch.tensor([3.0, 4.0])
    assert optimizer_step(model, opt, max_grad_norm=None) == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-3.6, -4.8]))  # unclipped


def test_autocast_is_noop_on_cpu():
    with autocast("cpu"):
        out = nn.Linear(3, 3)(torch.randn(2, 3))
    assert out.dtype == torch.float32


def test_maybe_compile_off_is_a_no_op():
    from elleci.model import ElleciConfig, ElleciLM
    model = ElleciLM(ElleciConfig.from_name("tiny"))
    assert maybe_compile(model) is model and maybe_compile(model, enabled=False) is model
    assert all(m._compiled_call_impl is None for m in model.modules())


def test_maybe_compile_on_compiles_each_block_in_place_same_outputs():
    from elleci.model import ElleciConfig, ElleciLM
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny")).train()
    ids = torch.randint(0, 512, (2, 16))
    ref = model(ids)
    # backend="eager": Dynamo traces the blocks but nothing is code-generated (inductor on this CPU: ~80 s)
    assert maybe_compile(model, enabled=True, backend="eager") is model
    assert all(blk._compiled_call_impl is not None for blk in model.blocks)
    assert model.lm_head._compiled_call_impl is None
    out = model(ids)
    out.float().mean().backward()
    assert torch.equal(out, ref) and model.blocks[0].ffn.w1.weight.grad is not None
    toy = Toy()
    assert maybe_compile(toy, enabled=True, backend="eager") is toy and toy._compiled_call_impl is not None


# ---------------------------------------------------------------------------------------------- resume

STEPS, SAVE_AT, ACCUM = 10, 4, 2


def make_run(seed):
    torch.manual_seed(seed)
    model = Toy()
    opt = make_optimizer(model, lr=3e-2, weight_decay=0.1)
    sched = make_scheduler(opt, "wsd", total_steps=STEPS, warmup_steps=2, decay_steps=4, min_ratio=0.1)
    return model, opt, sched


def train(model, opt, sched, batches, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = batches.batch(step)
        mbs = list(zip(x.chunk(ACCUM), y.chunk(ACCUM)))
        loss, _ = accumulate_gradients(lambda mb: lm_loss(model, mb), mbs)
        optimizer_step(model, opt, sched, max_grad_norm=1.0)
        losses.append(loss)
    return losses


def test_resume_reproduces_uninterrupted_run(tmp_path):
    stream = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(0))
    batches = TokenBatches(stream, seq_len=8, batch_size=4, seed=0)

    model, opt, sched = make_run(seed=0)
    reference = train(model, opt, sched, batches, 0, STEPS)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = make_run(seed=0)
    first = train(model, opt, sched, batches, 0, SAVE_AT)
    save_checkpoint(tmp_path / "ckpt", model, opt, sched, step=SAVE_AT, extra={"note": "mid-run"})
    assert first == reference[:SAVE_AT]

    model, opt, sched = make_run(seed=123)  # different init, fresh optimizer/scheduler, RNG moved on
    torch.rand(100)
    assert not torch.equal(model.head.weight, final["head.weight"])
    step, extra = load_checkpoint(tmp_path / "ckpt", model, opt, sched)
    assert step == SAVE_AT and extra == {"note": "mid-run"}
    resumed = first + train(model, opt, sched, batches, step, STEPS)

    assert resumed == reference  # exact float equality, step by step
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k

    # the RNG restore is what makes dropout repeat: without it the curve differs
    model, opt, sched = make_run(seed=5)
    load_checkpoint(tmp_path / "ckpt", model, opt, sched, restore_rng=False)
    assert train(model, opt, sched, batches, SAVE_AT, STEPS) != reference[SAVE_AT:]


def test_checkpoint_files_load_with_weights_only(tmp_path):
    model, opt, sched = make_run(seed=0)
    train(model, opt, sched, TokenBatches(torch.arange(50) % V, 8, 4, seed=1), 0, 2)
    random.seed(7), np.random.seed(7)
    save_checkpoint(tmp_path, model, opt, sched, step=2, extra={"tokens": 128, "best": torch.tensor(1.5)})
    expected = (random.random(), np.random.rand(), torch.rand(3))

    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["rng"]) >= {"torch", "python", "numpy"}
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 2
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(weights) == set(model.state_dict())

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    step, extra = load_checkpoint(tmp_path, Toy())
    assert step == 2 and extra["tokens"] == 128 and torch.equal(extra["best"], torch.tensor(1.5))
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_checkpoint_tied_weights_and_save_pretrained(tmp_path):
    src = Toy(tied=True)
    save_checkpoint(tmp_path / "tied", src, step=1)
    dst = Toy(tied=True)
    load_checkpoint(tmp_path / "tied", dst)
    assert torch.equal(dst.emb.weight, src.emb.weight) and dst.head.weight is dst.emb.weight

    # a model with a config (ElleciLM): the checkpoint is also a from_pretrained directory
    from elleci.model import ElleciConfig, ElleciLM
    torch.manual_seed(0)
    src = ElleciLM(ElleciConfig.from_name("tiny", n_layers=2))
    save_checkpoint(tmp_path / "pre", src, step=3)
    assert json.loads((tmp_path / "pre" / "config.json").read_text()) == src.config.to_dict()
    back = ElleciLM.from_pretrained(tmp_path / "pre")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in src.state_dict().items())
    torch.manual_seed(1)
    dst = ElleciLM(ElleciConfig.from_name("tiny", n_layers=2))
    assert load_checkpoint(tmp_path / "pre", dst)[0] == 3
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)
    with pytest.raises(ValueError, match="missing keys: 0.emb.weight.*unexpected keys: emb.weight"):  # strict
        load_checkpoint(tmp_path / "tied", nn.Sequential(Toy(tied=True), nn.Linear(2, 2)))


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope", Toy())
    save_checkpoint(tmp_path / "c", Toy(), step=1)
    (tmp_path / "c" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"/c: incomplete or inconsistent checkpoint: trainer_state.pt is missing"):
        load_checkpoint(tmp_path / "c", Toy())
    save_checkpoint(tmp_path / "d", Toy(), step=1)
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "d", Toy())
    with pytest.raises(ValueError, match="no optimizer state"):  # saved without an optimizer
        save_checkpoint(tmp_path / "e", Toy(), step=1)
        load_checkpoint(tmp_path / "e", Toy(), optimizer=make_optimizer(Toy(), lr=1e-3))
    assert not list(tmp_path.rglob(".*.tmp-*"))  # atomic writes leave no temporaries


# ---------------------------------------------------------------------------------------------- logging

def test_metric_logger_line_and_jsonl(tmp_path):
    lines = []
    path = tmp_path / "runs" / "a" / "metrics.jsonl"
    log = MetricLogger(path, print_fn=lines.append)
    log.log(12, loss=torch.tensor(0.693147), lr=3e-4, tok_per_s=310.2)
    log.log(13, **{"loss": 0.5, "rewards/margin": 0.12, "tokens": 4096})
    assert lines == ["step 12 | loss 0.6931 | lr 3.00e-04 | 310 tok/s",
                     "step 13 | loss 0.5000 | rewards/margin 0.1200 | tokens 4096"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2
    assert records[0]["step"] == 12 and records[0]["loss"] == pytest.approx(0.693147)
    assert records[0]["lr"] == 3e-4 and records[1] == {"step": 13, "loss": 0.5, "rewards/margin": 0.12,
                                                       "tokens": 4096}


def test_throughput_with_fake_clock():
    t = iter([10.0, 12.0, 12.5])
    tps = Throughput(clock=lambda: next(t))
    assert tps(1000) == 500.0 and tps(100) == 200.0
