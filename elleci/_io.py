"""Small file helpers shared by checkpoints, training state and the readers: atomic writes, JSON, decoding
text with errors that name the file and line."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import codecs

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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically: readers see the previous file or the whole new one."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_jsonl_atomic(path: str | os.PathLike, rows) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept), written atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` (inside a `publish_dir` block: no temporary needed)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ---- reading text -------------------------------------------------------------------------------------------

def _decode(data: bytes, path, first_line: int = 1) -> str:
    """data.decode("utf-8"), or ValueError("path:LINE: not valid UTF-8 (byte 0x.. at column C)")."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                         "re-encode the file as UTF-8") from None


def read_lines(path: str | os.PathLike):
    """Yield (line number, text without its line ending) for every line of a UTF-8 text file; a leading BOM is
    dropped and a byte that is not UTF-8 raises `ValueError("path:LINE: not valid UTF-8 (...)")`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            yield lineno, _decode(raw, path, lineno).rstrip("\r\n")


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file as one string (BOM dropped); decoding errors name the file and line."""
    data = Path(path).read_bytes()
    return _decode(data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data, path)


def read_json_file(path: str | os.PathLike, what: str = "JSON file"):
    """Parse a JSON file; every error names the file (and the line, for syntax errors)."""
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid {what} ({e.msg} at column {e.colno})") from None
