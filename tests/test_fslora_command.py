"""`elleci fslora CONFIG`: FSLoRA started through the elleci command, in one process and under torchrun.

The tiny config (configs/tiny/fslora.toml: 4 clients, 2 per round, budgets 2 and 4 of r = 4), 2 rounds, SGD
clients. Under torchrun with 2 processes each round's 2 sampled clients are trained where they live and their
masked deltas summed by one all_reduce; one process trains both and sums them itself. Each client's update
is the same computation in both runs (its batches, sketch and dropout come from (seed, round, client) alone),
and a sum of two deltas is the same in either order (a + b = b + a exactly in IEEE arithmetic; the
simulated sum adds them to a zero buffer, 0 + a = a): so the adapters agree to float32 round-off of
identical operations; 1e-6 allows for nothing more than that, while one missing client changes the
adapter by ~client_lr · |g| ≈ 1e-3.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elleci.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
ARGS = ["fslora.rounds=2", "fslora.client_optimizer=sgd", "fslora.client_lr=0.05", "fslora.eval_every=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fslora") / "base"
    assert main(["convert", "tiny", str(d), "--tokenizer", str(TINY / "tokenizer.model")]) == 0
    return d


def _adapter(out):
    return load_file(out / "final" / "adapter_model.safetensors")


def test_fslora_command_in_one_process_and_under_torchrun(base, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fslora", str(TINY / "fslora.toml"), f"model.path={base}", *ARGS]
    assert main(args + [f"out_dir={tmp_path / 'one'}"]) == 0
    one = _adapter(tmp_path / "one")
    rounds = (tmp_path / "one" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 2 and "eval_loss" in rounds[-1]
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-4    # B starts at 0: trained
    from elleci.recipes.loading import load_model
    load_model(str(tmp_path / "one" / "final"))                 # the adapter + its base load in one process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "elleci", *args, f"out_dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    two = _adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-6


@pytest.mark.parametrize("override, message", [
    ("fslora.budgets=[2, 8]", "[fslora] budgets: [8] outside [1, lora.r = 4]"),
    ("fslora.clients_per_round=5", "[fslora] clients_per_round: 5 > clients (4)"),
    ("lora.r=0", "[lora] r: FSLoRA trains a LoRA adapter"),
])
def test_fslora_config_errors_name_the_key(base, tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.chdir(ROOT)
    assert main(["fslora", str(TINY / "fslora.toml"), f"model.path={base}", f"out_dir={tmp_path}", override]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())                          # nothing written


def test_fslora_help_lists_its_settings(capsys):
    with pytest.raises(SystemExit):
        main(["fslora", "--help"])
    out = capsys.readouterr().out
    assert "[fslora]" in out and "clients_per_round" in out and "budgets" in out
