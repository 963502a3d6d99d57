"""INTERIM stand-in for issue 18's checkpoint API (`elleci.checkpointing`, `elleci.resume`), same signatures.

Used by `elleci.trainer.checkpoints` only while those modules are absent; delete this file when they land.
It reuses `elleci.train.save_checkpoint`'s files, published with one directory rename, plus run_config.json.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from elleci._io import atomic_path, write_json_atomic
from elleci.train import STATE_FILE
from elleci.train import load_checkpoint as _load
from elleci.train import save_checkpoint as _save

RUN_FILE = "run_config.json"


class ResumeMismatch(ValueError):
    """The checkpoint was made with other settings; `differences` = [(key, saved, current)]."""

    def __init__(self, path, differences):
        self.differences = differences
        lines = "\n".join(f"  {k}: {old!r} (checkpoint) -> {new!r} (now)" for k, old, new in differences)
        super().__init__(f"cannot resume from {path}: {len(differences)} setting(s) differ from the checkpoint's:\n"
                         f"{lines}\nresume with the checkpoint's settings, or allow deliberate changes by name "
                         f"(allow_changes={[k for k, _, _ in differences]!r})")


@contextmanager
def publish_dir(path):
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    os.mkdir(tmp)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(path) -> None:
    if os.path.isdir(path):
        gone = Path(path).parent / f".{Path(path).name}.tmp-del"
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)


def latest_checkpoint(out_dir, prefix: str = "checkpoint-"):
    out, pattern = Path(out_dir), re.compile(re.escape(prefix) + r"(\d+)")
    if not out.is_dir():
        return None
    found = [(int(m[1]), p) for p in out.iterdir() if (m := pattern.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def save_checkpoint(dir, model, optimizer=None, scheduler=None, *, step, extra=None, run_config=None):
    with publish_dir(dir) as tmp:
        _save(tmp, model, optimizer, scheduler, step=step, extra=extra)
        if run_config is not None:
            write_json_atomic(Path(tmp) / RUN_FILE, run_config)
    return Path(dir)


def _allowed(key: str, allow) -> bool:
    return any(key == a or key.startswith(a + ".") or key.endswith("." + a) for a in allow)


def load_checkpoint(dir, model, optimizer=None, scheduler=None, *, run_config=None, allow_changes=()):
    path = Path(dir)
    if run_config is not None and (path / RUN_FILE).is_file():
        saved = json.loads((path / RUN_FILE).read_text())
        keys = sorted(set(saved) | set(run_config))
        diffs = [(k, saved.get(k, "<absent>"), run_config.get(k, "<absent>")) for k in keys
                 if saved.get(k, "<absent>") != run_config.get(k, "<absent>") and not _allowed(k, allow_changes)]
        if diffs:
            raise ResumeMismatch(path, diffs)
    return _load(path, model, optimizer, scheduler)


def truncate_metrics(path, last_step: int) -> int:
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass                                    # a torn last line
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    return len(lines) - len(keep)
