"""Resume checks what it resumes (elleci.resume): the model config, the optimizer's settings and the run's
settings are compared before anything is loaded; metrics after the checkpoint are truncated."""
import json

import pytest
import torch
from torch import nn

from elleci.checkpointing import CheckpointError
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora
from elleci.resume import ResumeMismatch, load_checkpoint, save_checkpoint, truncate_metrics
from elleci.train import make_optimizer, make_scheduler, optimizer_step, wsd_lr

RUN = {"lr": 1e-3, "batch_size": 4, "seq_len": 32, "seed": 0, "steps": 10, "data": {"files": ["a.jsonl"]}}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", n_layers=2, **kw))


def run(model, lr=1e-3, steps=10):
    opt = make_optimizer(model, lr=lr)
    return opt, make_scheduler(opt, "wsd", total_steps=steps, warmup_steps=2, decay_steps=2)


def step(model, opt, sched):
    model(torch.arange(8)[None] % 512).float().pow(2).mean().backward()
    optimizer_step(model, opt, sched)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_config_with_the_same_shapes_is_refused_before_loading(tmp_path):
    save_checkpoint(tmp_path / "c", tiny(), step=3)
    other = tiny(seed=1, n_heads=8)                                 # same tensor shapes, another function
    before = snapshot(other)
    with pytest.raises(ResumeMismatch, match=r"model.n_heads: 4 \(checkpoint\) -> 8 \(now\)") as err:
        load_checkpoint(tmp_path / "c", other)
    assert [k for k, _, _ in err.value.differences] == ["model.n_heads"]
    assert unchanged(other, before)
    assert load_checkpoint(tmp_path / "c", other, allow_changes=["model.n_heads"])[0] == 3
    assert load_checkpoint(tmp_path / "c", tiny(seed=2, gradient_checkpointing=True))[0] == 3   # same math


def test_a_changed_lr_is_refused_and_when_allowed_it_is_used(tmp_path):
    model = tiny()
    opt, sched = run(model, lr=1e-3)
    for _ in range(3):
        step(model, opt, sched)
    save_checkpoint(tmp_path / "c", model, opt, sched, step=3)
    model2 = tiny(seed=1)
    opt2, sched2 = run(model2, lr=5e-3)
    before = snapshot(model2)
    with pytest.raises(ResumeMismatch, match=r"optimizer.lr: 0.001 \(checkpoint\) -> 0.005 \(now\)"):
        load_checkpoint(tmp_path / "c", model2, opt2, sched2)
    assert unchanged(model2, before) and opt2.param_groups[0]["initial_lr"] == 5e-3
    load_checkpoint(tmp_path / "c", model2, opt2, sched2, allow_changes=["lr"])
    mult = wsd_lr(3, total_steps=10, warmup_steps=2, decay_steps=2)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([5e-3 * mult] * 2, rel=1e-12)   # the new base LR
    step(model2, opt2, sched2)
    assert sched2.get_last_lr() == [5e-3 * wsd_lr(4, total_steps=10, warmup_steps=2, decay_steps=2)] * 2
    opt3, sched3 = run(tiny(), lr=1e-3)
    opt3.param_groups[0]["weight_decay"] = 0.3
    with pytest.raises(ResumeMismatch, match=r"optimizer.weight_decay: \[0.1, 0.0\] \(checkpoint\) -> \[0.3, 0.0\]"):
        load_checkpoint(tmp_path / "c", tiny(), opt3, sched3)


def test_run_settings_are_compared_and_every_difference_is_listed(tmp_path):
    save_checkpoint(tmp_path / "c", tiny(), step=5, run_config=RUN)
    assert json.loads((tmp_path / "c" / "run_config.json").read_text()) == RUN
    changed = {**RUN, "batch_size": 8, "seq_len": 64, "seed": 1, "steps": 20, "data": {"files": ["b.jsonl"]}}
    with pytest.raises(ResumeMismatch) as err:
        load_checkpoint(tmp_path / "c", tiny(), run_config=changed, allow_changes=["steps"])
    assert [k for k, _, _ in err.value.differences] == ["batch_size", "data.files", "seed", "seq_len"]
    assert "allow_changes=['batch_size', 'data.files', 'seed', 'seq_len']" in str(err.value)
    assert load_checkpoint(tmp_path / "c", tiny(), run_config={**RUN, "steps": 20}, allow_changes=["steps"])[0] == 5
    with pytest.raises(ResumeMismatch, match=r"new_key: '<absent>' \(checkpoint\) -> 1 \(now\)"):
        load_checkpoint(tmp_path / "c", tiny(), run_config={**RUN, "new_key": 1})
    with pytest.raises(ValueError, match="run_config must be JSON-serialisable"):
        save_checkpoint(tmp_path / "d", tiny(), step=1, run_config={"device": torch.device("cpu")})
    assert not (tmp_path / "d").exists()


def test_lora_settings_are_compared(tmp_path):
    model = apply_lora(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["attn.w_q"]))
    save_checkpoint(tmp_path / "c", model, step=1)
    other = apply_lora(tiny(), LoraConfig(r=4, lora_alpha=32, target_modules=["attn.w_q"]))   # same shapes
    with pytest.raises(ResumeMismatch, match=r"lora.lora_alpha: 8 \(checkpoint\) -> 32 \(now\)"):
        load_checkpoint(tmp_path / "c", other)


def test_a_truncated_state_file_is_named_before_the_weights_change(tmp_path):
    save_checkpoint(tmp_path / "c", tiny(), step=2)
    state = tmp_path / "c" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    other = tiny(seed=1)
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"/c: incomplete or inconsistent checkpoint: trainer_state.pt has 100 "
                                              r"bytes, the manifest says"):
        load_checkpoint(tmp_path / "c", other)
    assert unchanged(other, before)


class Note:
    pass


def test_extra_that_weights_only_refuses_fails_at_save_time(tmp_path):
    with pytest.raises(ValueError, match="weights_only"):
        save_checkpoint(tmp_path / "c", nn.Linear(2, 2), step=1, extra={"note": Note()})
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


def test_an_optimizer_of_another_parameter_set_is_refused_before_loading(tmp_path):
    model = tiny()
    opt, sched = run(model)
    save_checkpoint(tmp_path / "c", model, opt, sched, step=1)
    other = apply_lora(tiny(), LoraConfig(r=2, target_modules=["attn.w_q"]))
    with pytest.raises(ValueError, match="optimizer was saved with parameter groups of sizes"):
        load_checkpoint(tmp_path / "c", tiny(), *run(other), allow_changes=["optimizer"])


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(8)) + '{"step": 8, "lo')
    assert truncate_metrics(path, 4) == 4                                          # steps 5, 6, 7 and the torn line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert truncate_metrics(path, 10) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 3) == 0
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        truncate_metrics(path, 5)
