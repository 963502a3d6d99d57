"""The `elleci` command end to end on configs/tiny: stages, errors before anything is written, --plan,
resume after SIGKILL, SIGTERM. Everything runs from the repository root with tiny step counts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elleci.cli import STAGES, TOOLS, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
FAST = ["log.progress=none", "log.every=1", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "base"
    assert main(["convert", "tiny", str(out), "--tokenizer", str(TINY / "tokenizer.model")]) == 0
    return out


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_help_lists_commands_and_every_setting(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list(STAGES) + list(TOOLS))
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = capsys.readouterr().out
    for needle in ("[model]", "path = \"\"", "[train]", "batch_size = 16", "micro_batch_size = 4", "lr = 0.0001",
                   "[lora] (optional", "r = 16", "[loss]", 'type = "dpo"', "beta = 0.1", "[reference]",
                   'kind = "precomputed"', "[checkpoint]", "keep = 2", "[log]", "report_to = []", "--plan"):
        assert needle in text, needle


def test_sft_then_dpo_end_to_end(base, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert main(["sft", str(TINY / "sft.toml"), f"model.path={base}", f"out_dir={sft}", "train.steps=3",
                 "checkpoint.every=2", *FAST]) == 0
    out = capsys.readouterr().out
    assert f"results: {sft / 'final'}" in out
    assert sorted(p.name for p in sft.iterdir()) == ["checkpoint-2", "checkpoint-3", "config.toml", "final",
                                                     "metrics.jsonl"]
    records = [json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3] and "eval_loss" in records[-1]
    assert 'path = "' + str(base) + '"' in (sft / "config.toml").read_text()
    dpo = tmp_path / "dpo"
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={sft / 'final'}", f"out_dir={dpo}", "train.steps=2",
                 "loss.type=ipo", *FAST]) == 0
    final = dpo / "final"
    meta = json.loads((final / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str((sft / "final").resolve()) and meta["r"] == 8
    last = [json.loads(x) for x in (dpo / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/accuracy"} <= set(last)


@pytest.mark.parametrize("override, message", [
    ("train.bach_size=4", "unknown key 'bach_size' in [train]; did you mean 'batch_size'?"),
    ("train.steps=true", "[train] steps must be an integer, got true (a boolean)"),
    ("train.lr=-1", "[train] lr must be > 0, got -1"),
    ("loss.type=kto", '[loss] type must be one of "dpo", "cdpo", "ipo", "hinge", "robust", "simpo", "orpo"; got "kto"'),
    ("train.batch_size=6", "[train] batch_size: 6 must be a multiple of micro_batch_size 4"),
    ("data.train=nope.jsonl", "[data] train: nope.jsonl: no such file"),
])
def test_bad_settings_are_refused_before_anything_is_written(base, tmp_path, capsys, override, message):
    out = tmp_path / "never"
    code = main(["dpo", str(TINY / "dpo.toml"), f"model.path={base}", f"out_dir={out}", override])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_bad_key_in_the_file_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text((TINY / "sft.toml").read_text().replace("[train]\n", "[train]\nwarmup = 3\n"))
    assert main(["sft", str(cfg)]) == 2
    assert f"{cfg}: unknown key 'warmup' in [train]; did you mean 'warmup_steps'?" in capsys.readouterr().err


def test_malformed_data_line_names_file_and_line(base, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    lines = (TINY / "data" / "pairs.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"rejected"', '"rejeted"')
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "never"
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={base}", f"out_dir={out}", f"data.train={data}"]) == 2
    assert f"{data}:5: missing field 'rejected'" in capsys.readouterr().err
    assert not out.exists()


def test_plan_at_elleci_v1_size_reports_every_component(tmp_path, capsys):
    assert main(["dpo", str(TINY / "dpo.toml"), "model.path=elleci-v1", "model.tokenizer=configs/tiny/tokenizer.model",
                 "model.dtype=bfloat16", "model.gradient_checkpointing=true", "lora.r=16", "data.max_length=256",
                 "train.micro_batch_size=1", f"out_dir={tmp_path / 'never'}", "--plan"]) == 0
    text = capsys.readouterr().out
    for name in ("weights", "lora", "gradients", "optimizer", "bitlinear cache", "activations", "log-prob head",
                 "backward working set", "runtime", "peak", "without gradient checkpointing", "with it (on)",
                 "tokens per optimizer step: up to 4,096"):
        assert name in text, name
    weights = float(text.split("weights")[1].split("GiB")[0])
    assert weights == pytest.approx(1_377_245_376 * 2 / 2 ** 30, abs=0.01)    # bf16 elleci-v1
    assert not (tmp_path / "never").exists()


def _launch(args):
    return subprocess.Popen([sys.executable, "-m", "elleci", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def _weights(final: Path):
    return load_file(final / "model.safetensors")


def _deterministic(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "eta_s")} for r in rows]


def test_resume_after_sigkill_repeats_the_uninterrupted_run(base, tmp_path, capsys):
    args = ["sft", str(TINY / "sft.toml"), f"model.path={base}", "train.steps=8", "checkpoint.every=2",
            "model.device=cpu", "lora.r=4", "lora.dropout=0.1", *FAST]
    ref = tmp_path / "ref"
    assert main([*args, f"out_dir={ref}"]) == 0
    run = tmp_path / "killed"
    proc = _launch([*args, f"out_dir={run}"])
    _wait_for(run / "checkpoint-4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    assert main([*args, f"out_dir={run}"]) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = load_file(ref / "final" / "adapter_model.safetensors"), load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _deterministic(ref / "metrics.jsonl") == _deterministic(run / "metrics.jsonl")


def test_sigterm_leaves_a_resumable_checkpoint(base, tmp_path, capsys):
    run = tmp_path / "term"
    args = ["sft", str(TINY / "sft.toml"), f"model.path={base}", "train.steps=400", "checkpoint.every=0",
            "model.device=cpu", f"out_dir={run}", *FAST]
    proc = _launch(args)
    _wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received: stopped after step" in out
    (ckpt,) = [p for p in run.iterdir() if p.name.startswith("checkpoint-")]
    step = int(ckpt.name.split("-")[1])
    assert main([*args[:-len(FAST) - 1], f"out_dir={run}", f"train.steps={step + 2}", "--allow-change",
                 "train.steps", *FAST]) == 0
    assert f"resuming from {ckpt}" in capsys.readouterr().out and (run / "final" / "model.safetensors").is_file()
