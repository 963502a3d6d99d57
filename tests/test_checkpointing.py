"""elleci.checkpointing: publish_dir / verify_dir / latest_checkpoint, stale temporaries, file modes."""
import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from elleci import checkpointing as ck
from elleci._io import atomic_path, write_json_atomic
from elleci.checkpointing import CheckpointError, latest_checkpoint, locate_dir, publish_dir, remove_dir, verify_dir


def publish(path, files: dict):
    with publish_dir(path) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def side(path, kind, pid):
    host = ck._HOST
    return path.parent / f".{path.name}.{kind}-{host}-{pid}-0123abcd"


def test_publish_writes_a_manifest_of_sizes_and_sha256_last(tmp_path):
    files = {"model.safetensors": b"w" * 1000, "sub/tokenizer.json": b"{}", "config.json": b'{"a": 1}'}
    publish(tmp_path / "ckpt", files)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["format"] == "elleci-checkpoint" and manifest["version"] == 1
    assert manifest["files"] == {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    assert verify_dir(tmp_path / "ckpt")["files"] == manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]                   # no temporary left


def test_exception_leaves_nothing_and_the_old_directory_intact(tmp_path):
    publish(tmp_path / "ckpt", {"a": b"old"})
    with pytest.raises(RuntimeError, match="boom"):
        with publish_dir(tmp_path / "ckpt") as tmp:
            (tmp / "a").write_bytes(b"new, half written")
            raise RuntimeError("boom")
    assert (tmp_path / "ckpt" / "a").read_bytes() == b"old" and verify_dir(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    publish(tmp_path / "ckpt", {"b": b"new"})                                      # replace: old files gone
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["b", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]                   # no aside left


def test_files_and_directories_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        publish(tmp_path / "ckpt", {"w.bin": b"x"})
        write_json_atomic(tmp_path / "state.json", {"a": 1})
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            open(tmp, "wb").write(b"y")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "ckpt") == 0o755
    assert mode(tmp_path / "ckpt" / "w.bin") == mode(tmp_path / "ckpt" / "manifest.json") == 0o644
    assert mode(tmp_path / "state.json") == mode(tmp_path / "w.safetensors") == 0o644      # main: 0o600


def test_stale_temporaries_of_dead_saves_are_removed_by_the_next_save(tmp_path):
    pid = dead_pid()
    stale_dir, stale_file = side(tmp_path / "ckpt", "tmp", pid), side(tmp_path / "state.json", "tmp", pid)
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"0" * 10_000)
    stale_file.write_bytes(b"0" * 10_000)
    live = side(tmp_path / "ckpt", "tmp", os.getppid())                         # a save still running elsewhere
    live.mkdir()
    other_host = tmp_path / f".ckpt.tmp-zz{ck._HOST}-{pid}-0123abcd"            # another machine's save: not judged
    other_host.mkdir()
    write_json_atomic(tmp_path / "state.json", {"a": 1})
    assert not stale_file.exists() and stale_dir.exists()                       # a file write cleans its own name
    publish(tmp_path / "ckpt", {"a": b"1"})
    assert not stale_dir.exists() and live.exists() and other_host.exists()


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out exists and is not an elleci checkpoint .*notes.txt"):
        publish(tmp_path / "out", {"a": b"1"})
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "empty").mkdir()
    publish(tmp_path / "empty", {"a": b"1"})                                     # an empty directory is fine
    verify_dir(tmp_path / "empty")


def test_verify_dir_names_the_path_and_each_problem(tmp_path):
    d = publish(tmp_path / "c", {"a": b"12345", "b": b"xyz"})
    (d / "a").write_bytes(b"54321")                                                # same size, other bytes
    (d / "b").write_bytes(b"xy")                                                   # truncated
    with pytest.raises(CheckpointError, match=r"/c: incomplete or inconsistent checkpoint: a does not match its "
                                              r"SHA-256.*; b has 2 bytes, the manifest says 3"):
        verify_dir(d)
    with pytest.raises(CheckpointError, match="b has 2 bytes"):
        verify_dir(d, check_hashes=False)                                          # sizes are always checked
    with pytest.raises(CheckpointError, match="c is not part of it"):
        verify_dir(publish(tmp_path / "e", {"a": b"1"}), required=("c",))
    (tmp_path / "f").mkdir()
    with pytest.raises(CheckpointError, match="/f: no manifest.json"):
        verify_dir(tmp_path / "f")
    assert verify_dir(tmp_path / "f", missing_ok=True) is None
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        verify_dir(tmp_path / "absent")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify_dir(d)


def test_a_kill_between_the_two_renames_keeps_the_old_copy_findable(tmp_path, monkeypatch):
    old = publish(tmp_path / "checkpoint-5", {"a": b"old"})
    real, calls = os.rename, []

    def rename(src, dst):              # fail the second rename (temporary -> target): the window of a kill
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real(src, dst)
    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        publish(old, {"a": b"new"})
    monkeypatch.setattr(ck.os, "rename", real)
    assert not old.exists()
    with pytest.warns(UserWarning, match="checkpoint-5 is missing.*reading the previous complete copy"):
        found = locate_dir(old)
    assert (found / "a").read_bytes() == b"old"
    with pytest.warns(UserWarning, match="using the complete copy"):
        assert latest_checkpoint(tmp_path) == found
    publish(old, {"a": b"newer"})                         # the next save puts the aside back, then replaces it
    assert (old / "a").read_bytes() == b"newer" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_latest_checkpoint_skips_incomplete_ones_with_a_warning(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None and latest_checkpoint(tmp_path) is None
    publish(tmp_path / "checkpoint-1", {"a": b"1"})
    publish(tmp_path / "checkpoint-10", {"a": b"10"})
    (tmp_path / "checkpoint-10" / "a").write_bytes(b"xx")                        # damaged
    (tmp_path / "checkpoint-20").mkdir()                                         # no manifest
    (tmp_path / "checkpoint-20" / "a").write_bytes(b"20")
    (tmp_path / "checkpoint-x").mkdir()                                          # not a step
    with pytest.warns(UserWarning) as rec:
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    msgs = [str(w.message) for w in rec]
    assert "skipping incomplete checkpoint" in msgs[0] and "checkpoint-20" in msgs[0]
    assert "checkpoint-10" in msgs[1] and "a does not match its SHA-256" in msgs[1]
    remove_dir(tmp_path / "checkpoint-1")
    assert not (tmp_path / "checkpoint-1").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_latest_checkpoint_clears_a_deletion_left_by_a_killed_process(tmp_path):
    """A run killed inside `remove_dir` (after the rename aside, before the rmtree) may resume with nothing
    left to save: the scan for the newest checkpoint removes that dead process's `.del-*` and `.tmp-*`
    directories, and leaves a live process's alone."""
    with publish_dir(tmp_path / "checkpoint-2") as tmp:
        (tmp / "w.bin").write_bytes(b"2")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [tmp_path / f".checkpoint-1.{kind}-{ck._HOST}-{dead.pid}-0123abcd" for kind in ("del", "tmp")]
    alive = tmp_path / f".checkpoint-3.tmp-{ck._HOST}-{os.getppid()}-0123abcd"     # a writer still running
    for d in left + [alive]:
        d.mkdir()
        (d / "w.bin").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "checkpoint-2"])
