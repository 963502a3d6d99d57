"""Fault injection on training (elleci.resume): a run killed with SIGKILL at random instants and resumed
repeats the uninterrupted run bit for bit (same program, same thread count: the same computation), its
metrics hold every step once, and a resume with a changed setting is refused by name."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elleci.checkpointing import checkpoint_steps, latest_checkpoint
from elleci.resume import ResumeMismatch, load_checkpoint

CHILD = Path(__file__).with_name("train_child.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
STEPS = 12


def start(out, *args):
    return subprocess.Popen([sys.executable, str(CHILD), str(out), "--steps", str(STEPS), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def kill_after_saves(out, n_saves, delay, *args):
    """Start the child, wait until it has saved `n_saves` times in this run, sleep `delay`, SIGKILL it."""
    child, saved = start(out, *args), 0
    while saved < n_saves:
        line = child.stdout.readline()
        assert line, f"child ended early: {child.stderr.read()}"
        saved += line.startswith("saved")
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.communicate()


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_killed_runs_resume_bit_for_bit_and_refuse_changed_settings(tmp_path):
    rng = random.Random(0)
    whole = start(tmp_path / "a")                                     # the uninterrupted run, alongside

    out = tmp_path / "b"
    kill_after_saves(out, 3, rng.uniform(0.0, 0.05))                  # killed inside or between saves
    kill_after_saves(out, 2, rng.uniform(0.0, 0.05), "--resume")      # ... twice

    # the newest complete checkpoint is consistent, and a changed setting is refused by name
    sys.path.insert(0, str(CHILD.parent))
    try:
        import train_child
    finally:
        sys.path.remove(str(CHILD.parent))
    model, opt, sched, settings = train_child.setup(STEPS, lr=0.02)
    ckpt = latest_checkpoint(out)
    with pytest.raises(ResumeMismatch, match=r"lr: 0.01 \(checkpoint\) -> 0.02 \(now\)") as err:
        load_checkpoint(ckpt, model, opt, sched, run_config={**settings, "lr": 0.02})
    assert [k for k, _, _ in err.value.differences] == ["optimizer.lr", "lr"]
    step, extra = load_checkpoint(ckpt, model, run_config={**settings, "lr": 0.01})
    assert step == int(ckpt.name.split("-")[1]) and extra["weights_sha256"] == train_child.weights_digest(model)

    done = subprocess.run([sys.executable, str(CHILD), str(out), "--steps", str(STEPS), "--resume"],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("resumed ")
    assert whole.wait() == 0, whole.stderr.read()

    assert (out / "final.safetensors").read_bytes() == (tmp_path / "a" / "final.safetensors").read_bytes()
    assert losses(out) == losses(tmp_path / "a")                      # every step once, the same losses
    assert [s for s, _ in losses(out)] == list(range(STEPS))
    # the last two checkpoints kept; a kill between a save and its pruning of the oldest can leave that one
    # too when the resumed run has no step left to save (and so to prune) after it
    kept = sorted(checkpoint_steps(out))
    assert kept[-2:] == [11, 12] and (kept[:-2] == [] or kept[:-2] == [10])
    others = sorted(p.name for p in out.iterdir() if p.name not in {f"checkpoint-{k}" for k in kept})
    assert others == ["final.safetensors", "metrics.jsonl"]                 # no aside of a killed save is left
