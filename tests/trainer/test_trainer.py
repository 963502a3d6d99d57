"""The trainer: accumulation normalised over the whole step, data order, the LR of the first and last step,
resume after a crash repeating the uninterrupted run, checkpoints kept, SIGTERM."""
import copy
import json
import os
import signal

import pytest
import torch

from elleci.algos import dpo_loss
from elleci.algos.preference import collate_fn, encode_pairs, pairwise_step
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora
from elleci.trainer import (ResumeMismatch, Trainer, TrainerConfig, TrainingInterrupted, accumulation_steps,
                            micro_batches, step_indices)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"ciao {a} mondo {b} hello world {a + b} risposta" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300)


def _model(seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300))


def _sft_examples(tok, n=6):
    convs = [[{"role": "user", "content": "ciao " * (1 + i % 3) + str(i)},
              {"role": "assistant", "content": "mondo " * (1 + (i * 5) % 7) + "risposta"}] for i in range(n)]
    return encode_sft(tok, convs)


def _pairs(tok, n=4):
    recs = [{"prompt": f"ciao {i}", "chosen": "mondo " * (1 + i), "rejected": "hello world " * (3 - i % 3)}
            for i in range(n)]
    items = encode_pairs(tok, recs)
    for i, it in enumerate(items):
        it["ref_chosen_logps"], it["ref_rejected_logps"] = -10.0 - i, -12.0 + i
    return items


def _one_step(model, step_fn, data, collate, micro, batch, units=None):
    cfg = TrainerConfig(steps=1, batch_size=batch, micro_batch_size=micro, lr=0.5, optimizer="sgd",
                        max_grad_norm=0.0, progress="none", handle_signals=False)
    kw = {"units": units} if units else {}
    Trainer(model, step_fn, data, cfg, collate=collate, **kw).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_micro_batches_of_one_give_the_full_batch_step_sft(tok):
    """Sequences of different lengths: one step with micro_batch_size = batch_size equals the step with
    micro_batch_size = 1 (SGD, fp32, 1e-6), and differs from per-micro-batch normalisation (the old bug)."""
    data = _sft_examples(tok, 6)
    lengths = sorted({sum(1 for x in lab if x != -100) for _, lab in data})
    assert len(lengths) > 2                                     # really ragged
    base = _model()
    full = _one_step(copy.deepcopy(base), sft_step, data, sft_collate(tok.pad_id), 6, 6)
    ones = _one_step(copy.deepcopy(base), sft_step, data, sft_collate(tok.pad_id), 1, 6)
    twos = _one_step(copy.deepcopy(base), sft_step, data, sft_collate(tok.pad_id), 2, 6)
    moved = max((full[k] - base.state_dict()[k]).abs().max().item() for k in full)
    assert moved > 1e-3                                         # the step did something
    for k in full:
        torch.testing.assert_close(ones[k], full[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(twos[k], full[k], rtol=0, atol=1e-6)
    # per-micro-batch mean (each micro-batch weighted 1/M): measurably different
    naive = _one_step(copy.deepcopy(base), sft_step, data, sft_collate(tok.pad_id), 1, 6, units=lambda b: 1)
    assert max((naive[k] - full[k]).abs().max().item() for k in full) > 1e-4


def test_micro_batches_of_one_give_the_full_batch_step_dpo(tok):
    data = _pairs(tok, 4)
    step = pairwise_step(dpo_loss, beta=0.5, reference="precomputed")
    base = _model()
    full = _one_step(copy.deepcopy(base), step, data, collate_fn("pairs", tok.pad_id), 4, 4)
    ones = _one_step(copy.deepcopy(base), step, data, collate_fn("pairs", tok.pad_id), 1, 4)
    for k in full:
        torch.testing.assert_close(ones[k], full[k], rtol=0, atol=1e-6)


def test_data_order_depends_on_seed_and_step_only():
    n, B = 10, 4
    seen = [i for s in range(5) for i in step_indices(n, B, s, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))   # epochs
    assert step_indices(n, B, 2, 3) == seen[8:12] and step_indices(n, B, 2, 4) != seen[8:12]
    items = list(range(8))
    split = [x for r in range(2) for mb in micro_batches(items, 2, r, 2) for x in mb]
    assert split == items
    assert accumulation_steps(16, 4, 2) == 2
    with pytest.raises(ValueError, match="batch_size 10 .* micro_batch_size 4 × world size 1 = 4"):
        accumulation_steps(10, 4, 1)


def test_one_step_trains_and_logs_the_lr_it_used(tok):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    cfg = TrainerConfig(steps=1, batch_size=2, micro_batch_size=2, lr=1e-3, progress="none", handle_signals=False)
    hist = Trainer(model, sft_step, _sft_examples(tok, 2), cfg, collate=sft_collate(tok.pad_id)).train()
    assert hist[0]["lr"] == pytest.approx(1e-3)                 # not the next step's 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _cfg(out, steps=6, **kw):
    base = dict(steps=steps, batch_size=2, micro_batch_size=1, lr=1e-2, warmup_steps=1, checkpoint_every=2,
                keep=2, log_every=1, out_dir=str(out), progress="none", handle_signals=False)
    return TrainerConfig(**{**base, **kw})


class _Crash(Exception):
    pass


def _crashing(step_fn, after_calls):
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise _Crash
        return step_fn(model, batch)
    return fn


def _deterministic(records):
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "eta_s")} for r in records]


def test_resume_after_a_crash_repeats_the_uninterrupted_run(tok, tmp_path):
    """LoRA with dropout (so the RNG matters), AdamW: crash in step 5, resume from checkpoint-4."""
    data = _sft_examples(tok, 6)

    def run(out, fn):
        model = _model()
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
        torch.manual_seed(123)
        Trainer(model, fn, data, _cfg(out), collate=sft_collate(tok.pad_id), tokenizer=tok).train()
        return model

    ref = run(tmp_path / "a", sft_step)
    with pytest.raises(_Crash):
        run(tmp_path / "b", _crashing(sft_step, 2 * 4 + 1))      # 2 micro-batches per step: dies in step 5
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-4"]
    resumed = run(tmp_path / "b", sft_step)
    for (k, v), w in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert _deterministic(a) == _deterministic(b) and [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-4", "checkpoint-6"]                         # keep = 2
    assert (tmp_path / "b" / "final" / "adapter_model.safetensors").is_file()


def test_resume_refuses_a_changed_setting_unless_allowed(tok, tmp_path):
    data = _sft_examples(tok, 4)
    Trainer(_model(), sft_step, data, _cfg(tmp_path, steps=2), collate=sft_collate(tok.pad_id)).train()
    with pytest.raises(ResumeMismatch, match="trainer.lr"):
        Trainer(_model(), sft_step, data, _cfg(tmp_path, steps=2, lr=5e-2), collate=sft_collate(tok.pad_id)).train()
    more = Trainer(_model(), sft_step, data, _cfg(tmp_path, steps=4, allow_changes=("trainer.steps",)),
                   collate=sft_collate(tok.pad_id))
    hist = more.train()
    assert [r["step"] for r in hist] == [3, 4]


def test_sigterm_saves_a_resumable_checkpoint(tok, tmp_path):
    data = _sft_examples(tok, 4)
    cfg = _cfg(tmp_path, steps=5, checkpoint_every=0, handle_signals=True)

    def step_fn(model, batch, calls=[0]):
        calls[0] += 1
        if calls[0] == 3:                                           # during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return sft_step(model, batch)
    with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped after step 2"):
        Trainer(_model(), step_fn, data, cfg, collate=sft_collate(tok.pad_id)).train()
    assert (tmp_path / "checkpoint-2").is_dir() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    hist = Trainer(_model(), sft_step, data, _cfg(tmp_path, steps=5, checkpoint_every=0),
                   collate=sft_collate(tok.pad_id)).train()
    assert [r["step"] for r in hist] == [3, 4, 5]


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_the_last_step_never_runs_at_lr_zero(kind):
    """For every run length S and warmup W < S the LR multiplier of the last update (step S - 1) is > 0; the
    LR the trainer logs for a step is the one that step used (not the next step's, which is 0 at step S)."""
    from elleci.train import cosine_lr, wsd_lr
    for S in range(1, 40):
        for W in range(0, S):
            m = cosine_lr(S - 1, total_steps=S, warmup_steps=W) if kind == "cosine" else \
                wsd_lr(S - 1, total_steps=S, warmup_steps=W, decay_steps=max(1, S - W) if S > W else 0)
            assert m > 0, (S, W)


def test_reporters_and_progress_lines(tmp_path, capsys):
    import importlib.util

    from elleci.trainer.reporting import Progress, format_record
    line = format_record({"step": 3, "loss": 0.5, "rewards/accuracies": 1.0, "tok_per_s": 310.4, "eta_s": 80.0}, 10)
    assert line == "step 3/10 | loss 0.5000 | 310 tok/s | ETA 1m20s"
    p = Progress(10, 0, "auto", print_fn=print)                   # pytest's stderr is not a terminal: lines
    assert p.mode == "lines"
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            TrainerConfig(steps=1, report_to=("tensorboard",))
    with pytest.raises(ValueError, match="unknown reporter 'tb'"):
        TrainerConfig(steps=1, report_to=("tb",))


def test_eval_tasks_without_the_eval_package_say_so(tok):
    import importlib.util
    if importlib.util.find_spec("elleci.eval") is not None:
        pytest.skip("elleci.eval is installed here")
    cfg = TrainerConfig(steps=1, batch_size=2, micro_batch_size=2, progress="none", handle_signals=False)
    t = Trainer(_model(), sft_step, _sft_examples(tok, 2), cfg, collate=sft_collate(tok.pad_id), eval_tasks=["x"])
    with pytest.raises(RuntimeError, match=r"\[eval\] tasks = \['x'\] needs elleci.eval"):
        t.train()


def test_a_fresh_start_drops_the_metrics_of_a_run_that_left_no_checkpoint(tok, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    Trainer(_model(), sft_step, _sft_examples(tok, 2), _cfg(tmp_path, steps=2, checkpoint_every=0),
            collate=sft_collate(tok.pad_id)).train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
