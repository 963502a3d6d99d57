"""TensorBoard and W&B reporters: what the trainer logs reaches them (TensorBoard read back from its event
files; W&B through its offline mode and through a recorded fake of its API), and a missing package is
refused before anything runs."""
import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest
import torch

from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.trainer import Trainer, TrainerConfig


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "t.txt").write_text("\n".join(f"ciao {a} mondo {b} hello {a + b}" for a in range(10) for b in range(10)))
    return Tokenizer.train(d / "t.txt", vocab_size=300)


def _run(tok, out, report_to, steps=3):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300))
    data = encode_sft(tok, [[{"role": "user", "content": f"ciao {i}"}, {"role": "assistant", "content": "mondo " * (i + 1)}]
                            for i in range(4)])
    cfg = TrainerConfig(steps=steps, batch_size=2, micro_batch_size=2, lr=1e-3, log_every=1, out_dir=str(out),
                        report_to=report_to, progress="none", handle_signals=False)
    Trainer(model, sft_step, data, cfg, collate=sft_collate(tok.pad_id), tokenizer=tok).train()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_gets_every_logged_scalar(tok, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = _run(tok, tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_is_written(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tok, tmp_path, ["wandb"], steps=2)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_wandb_reporter_calls(tok, tmp_path, monkeypatch):
    """With a recorded fake `wandb` module: init once with the run's settings, one log per record at its
    step (without the step key), finish at the end."""
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(finish=lambda: calls.append(("finish",)))
    fake.log = lambda data, step: calls.append(("log", step, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = _run(tok, tmp_path, ["wandb"], steps=2)
    assert calls[0][0] == "init" and calls[0][1]["dir"] == str(tmp_path) and calls[0][1]["name"] == tmp_path.name
    assert calls[0][1]["config"]["trainer.lr"] == 1e-3                       # the compared settings
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [r["step"] for r in records]
    assert [c[2]["loss"] for c in logs] == [r["loss"] for r in records] and "step" not in logs[0][2]
    assert calls[-1] == ("finish",)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_package_is_refused_before_anything_runs(name, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(ValueError, match=f"pip install {name}"):
        TrainerConfig(steps=1, report_to=(name,))
