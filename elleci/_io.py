"""Small file helpers shared by checkpoints and training state: atomic writes, JSON."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from elleci.checkpointing import _ACTIVE, _SIDE, _fsync_dir, _is_stale, _remove, side_path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the `.<name>.tmp-*` files left beside `path` by writes of `path` whose process is gone."""
    path, removed = Path(path), []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = _SIDE.match(p.name)
            if m and m["kind"] == "tmp" and m["name"] == path.name and _is_stale(p):
                _remove(p)
                removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    A crash (or an exception in the block) leaves any previous `path` untouched; an exception removes the
    temporary file, and the temporaries of killed writes of `path` (`.<name>.tmp-<host>-<pid>-<rand>`, pid no
    longer running) are removed by the next write. The file gets the umask's mode, like `open(path, "w")`.

        with atomic_path("out/model.safetensors") as tmp:
            safetensors.torch.save_file(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = side_path(path, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))   # 0o666 & ~umask (mkstemp: 0o600)
    _ACTIVE.add(str(tmp))
    try:
        yield str(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _ACTIVE.discard(str(tmp))
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` (inside a `publish_dir` block: no temporary needed)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
