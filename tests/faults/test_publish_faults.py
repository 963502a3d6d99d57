"""Fault injection on the checkpoint format (elleci.checkpointing): savers killed with SIGKILL at random
instants, and every file operation of a save made to fail in turn. The invariants checked after each fault:
a checkpoint that loads never mixes two saves, the previous complete one is always found, and the next save
leaves no temporary, aside or half-deleted directory behind."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from elleci.checkpointing import latest_checkpoint, locate_dir, publish_dir, verify_dir

CHILD = Path(__file__).with_name("publish_child.py")


def generation(path: Path) -> int:
    """The generation every file of a verified checkpoint encodes; raises if they disagree (mixed content)."""
    verify_dir(path)
    g = int((path / "gen.txt").read_text())
    for i in range(3):
        data = (path / f"part{i}.bin").read_bytes()
        assert len(data) == 100_000 * (i + 1) and set(data) == {g % 251}, f"{path}: part{i} is not of generation {g}"
    return g


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_savers_killed_at_random_instants_never_leave_a_mixed_or_lost_checkpoint(tmp_path):
    rng, out = random.Random(0), tmp_path / "out"
    out.mkdir()
    floor, seen = 0, set()
    for round_ in range(20):
        child = subprocess.Popen([sys.executable, str(CHILD), str(out), str(1000 * round_)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        time.sleep(rng.uniform(0.05, 0.5))
        child.send_signal(signal.SIGKILL)
        stdout, stderr = child.communicate()
        assert child.returncode == -signal.SIGKILL, f"the saver failed before it was killed:\n{stderr[-2000:]}"
        printed = [int(line.split()[1]) for line in stdout.splitlines()]
        seen.update(n.split(".")[2].split("-")[0] for n in hidden(out))          # tmp / old / del left by the kill
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                                      # fallbacks say so: checked below
            ckpt = locate_dir(out / "ckpt") if (out / "ckpt").exists() or floor else None
            latest = latest_checkpoint(out)
        # the generation found is complete, of one save, and never older than the last one published
        last = max(printed, default=0)
        if ckpt is not None:
            g = generation(ckpt)
            assert g >= max(last, floor), (round_, g, last, floor)
        if latest is not None:
            g_latest = generation(latest)
            assert latest.name == f"checkpoint-{g_latest}" or latest.name.startswith(f".checkpoint-{g_latest}.old-")
            assert g_latest >= last
        # the next save (here: this process) cleans every leftover of the killed one
        with publish_dir(out / "probe") as tmp:
            (tmp / "x").write_text("1")
        assert hidden(out) == [], (round_, hidden(out))
        floor = generation(out / "ckpt") if (out / "ckpt").exists() else floor
    print("leftovers seen:", sorted(seen))
    assert "tmp" in seen, "no kill landed inside a save: the test did not test anything"


# ---- every file operation of a save fails in turn (deterministic) ----------------------------------

class Faults:
    """Count the Python-level file operations (mkdir, open for writing, fsync, rename, replace) under `root`;
    raise OSError at operation number `fail_at`. (safetensors and torch.save write from C++: a kill inside
    them is what the SIGKILL tests exercise.)"""

    def __init__(self, monkeypatch, root: Path, fail_at: int | None):
        self.root, self.fail_at, self.count = str(root), fail_at, 0
        import builtins
        for mod, name in ((os, "mkdir"), (os, "rename"), (os, "replace"), (os, "fsync"), (builtins, "open")):
            monkeypatch.setattr(mod, name, self.wrap(getattr(mod, name), name))

    def wrap(self, fn, name):
        def op(*args, **kw):
            target = args[0]
            mine = isinstance(target, int) or str(target).startswith(self.root)
            if name == "open" and not any(c in (args[1] if len(args) > 1 else kw.get("mode", "r")) for c in "wax+"):
                mine = False
            if name == "mkdir" and os.path.isdir(target):       # Path.mkdir(exist_ok=True): not an operation
                mine = False
            if mine:
                self.count += 1
                if self.count == self.fail_at:
                    raise OSError(f"injected failure of {name} #{self.count}")
            return fn(*args, **kw)
        return op


def test_every_failing_file_operation_of_a_training_checkpoint_leaves_old_or_new_never_mixed(tmp_path, monkeypatch):
    import torch
    from torch import nn

    from elleci.resume import load_checkpoint, save_checkpoint

    def state(g):
        model = nn.Linear(8, 8)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(g))
        return model

    def check(path, allowed):
        model = nn.Linear(8, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step, extra = load_checkpoint(path, model)
        assert step in allowed and extra == {"gen": step}
        assert all(torch.equal(p, torch.full_like(p, float(step))) for p in model.parameters()), "mixed content"
        return step

    target = tmp_path / "run" / "checkpoint"
    save_checkpoint(target, state(1), step=1, extra={"gen": 1})
    with monkeypatch.context() as m:
        probe = Faults(m, tmp_path, None)
        save_checkpoint(target, state(2), step=2, extra={"gen": 2})
    n_ops = probe.count
    assert n_ops >= 8                        # mkdir, fsync of each file, manifest, fsyncs, two renames
    outcomes = []
    for k in range(1, n_ops + 1):
        with monkeypatch.context() as m:
            Faults(m, tmp_path, k)
            with pytest.raises(OSError, match=f"injected failure of .* #{k}$"):
                save_checkpoint(target, state(3), step=3, extra={"gen": 3})
        outcomes.append(check(target, {2, 3}))           # the previous checkpoint or the complete new one
        save_checkpoint(target, state(2), step=2, extra={"gen": 2})         # the next save repairs everything
        assert check(target, {2}) == 2 and hidden(target.parent) == []
    # before the rename that publishes: the old checkpoint; after it (the final fsync of the parent): the new one
    assert outcomes == sorted(outcomes) and outcomes[0] == 2 and outcomes.count(2) >= n_ops - 2
    manifest = json.loads((target / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "trainer_state.pt"}


def test_every_failing_file_operation_of_save_pretrained_keeps_config_and_weights_together(tmp_path, monkeypatch):
    """Finding 1 of issue 18: on main a crash between the weights and config.json loaded silently with the
    wrong config (another n_heads, same shapes). Old model: 4 heads; new: 8 heads and other weights."""
    import torch

    from elleci.model import ElleciConfig, ElleciLM

    def model(seed, heads):
        torch.manual_seed(seed)
        return ElleciLM(ElleciConfig.from_name("tiny", n_layers=2, n_heads=heads))

    old, new = model(0, 4), model(1, 8)
    target = tmp_path / "m"
    old.save_pretrained(target)
    old.save_pretrained(tmp_path / "probe")
    with monkeypatch.context() as m:                                   # count the operations of a replace
        probe = Faults(m, tmp_path, None)
        new.save_pretrained(tmp_path / "probe")
    seen = set()
    for k in range(1, probe.count + 1):
        with monkeypatch.context() as m:
            Faults(m, tmp_path, k)
            with pytest.raises(OSError, match=f"injected failure of .* #{k}$"):
                new.save_pretrained(target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = ElleciLM.from_pretrained(target)
        want = {4: old, 8: new}[loaded.config.n_heads]
        assert all(torch.equal(v, want.state_dict()[n]) for n, v in loaded.state_dict().items()), (k, "mixed")
        seen.add(loaded.config.n_heads)
        old.save_pretrained(target)                                    # back to the old one for the next k
        assert hidden(tmp_path) == []
    assert 4 in seen
