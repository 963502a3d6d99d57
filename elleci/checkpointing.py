"""Checkpoint directories that cannot tear: written aside, listed in a manifest, published by one rename.

Every saver in elleci (model, adapter, training state, iterative-DPO rounds, LESS shards) writes a
directory through `publish_dir`, and every reader verifies it with `verify_dir`:

    with publish_dir("out/checkpoint-200") as tmp:        # tmp = out/.checkpoint-200.tmp-<host>-<pid>-<rand>
        save_file(weights, tmp / "model.safetensors")    # write anything into tmp
    verify_dir("out/checkpoint-200")                     # raises CheckpointError naming the path and the problem
    latest_checkpoint("out")                             # newest COMPLETE out/checkpoint-<step>, or None

The protocol (one writer per target directory):
1. The files are written into a fresh hidden sibling `.<name>.tmp-<host>-<pid>-<rand>`, created with the
   umask's mode (like every file in it). An exception in the block removes it.
2. On normal exit every file is fsynced and `manifest.json` is written LAST: each file's path, size and
   SHA-256. The temporary directory is fsynced.
3. Publishing. A new target: one `rename(tmp, target)`. An existing target: `rename(target, aside)` with
   aside = `.<name>.old-<host>-<pid>-<rand>`, then `rename(tmp, target)`, then the aside is deleted. The
   parent directory is fsynced after the renames.
   A kill at any instant therefore leaves `target` either absent, or the old complete directory, or the
   new complete one, never a mix. In the only window where `target` is absent (between the two renames)
   the old complete copy is the aside: readers find it (`locate_dir`, `latest_checkpoint`) and the next
   save into that place renames it back first.
4. The next `publish_dir` in the same parent removes the temporaries, asides and deletions of saves whose
   process is gone (same host, pid no longer running; an aside whose target is missing is renamed back
   instead): a killed save never leaves its full-size files behind for longer than the next save. Only a non-empty directory without `manifest.json` (not a
   checkpoint: user files) is refused as a target, so publishing never deletes files it did not write.

A reader only trusts files the manifest lists; other files in a checkpoint (a `cache.json` a caller adds
after publishing) are ignored by `verify_dir`. Imports nothing from elleci: the lowest layer.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "elleci-checkpoint"
VERSION = 1
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_SIDE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR, errno.EPERM)
_ACTIVE: set[str] = set()          # side paths this process is writing right now (never stale)


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or inconsistent (missing manifest, a file's size or hash differs)."""


# ---- side files: temporaries, asides, deletions ---------------------------------------------------

def side_path(target: str | os.PathLike, kind: str) -> Path:
    """A fresh hidden sibling `.<name>.<kind>-<host>-<pid>-<rand>` of `target` (kind: tmp, old or del)."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # alive, owned by someone else
        return True
    return True


def _is_stale(path: Path) -> bool:
    m = _SIDE.match(path.name)
    if m is None or m["host"] != _HOST or str(path) in _ACTIVE:
        return False
    return int(m["pid"]) == os.getpid() or not _pid_alive(int(m["pid"]))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_stale(parent: str | os.PathLike, kinds=("tmp", "old", "del")) -> list[Path]:
    """Clean up after saves in `parent` whose process is gone: delete their temporaries and deletions, and
    their asides whose target exists again; an aside whose target is missing is the last complete copy, so
    it is renamed back into place instead. Only side files of the given `kinds`. Returns the paths removed
    or restored."""
    parent, done = Path(parent), []
    if not parent.is_dir():
        return done
    for p in parent.iterdir():
        m = _SIDE.match(p.name)
        if m is None or m["kind"] not in kinds or not _is_stale(p):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists():
            if read_manifest(p) is not None:
                os.rename(p, target)
                _fsync_dir(parent)
                done.append(p)
            continue
        _remove(p)
        done.append(p)
    return done


def asides(target: str | os.PathLike) -> list[Path]:
    """Aside copies `.<name>.old-*` of `target`, newest first (by modification time)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir()
             if (m := _SIDE.match(p.name)) and m["kind"] == "old" and m["name"] == target.name]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: renames, new files); a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


# ---- the manifest -----------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def write_manifest(root: str | os.PathLike) -> dict:
    """fsync every file under `root`, then write `root/manifest.json` = {format, version, files: {relpath:
    {size, sha256}}} and fsync it and the directories. Returns the manifest."""
    root = Path(root)
    files = {}
    for p in _files(root):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": file_digest(p)}
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    with open(root / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in _files(root)} | {root}, key=lambda d: -len(d.parts)):
        _fsync_dir(d)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of checkpoint directory `path`, or None when it has none. A malformed one raises."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e}); the checkpoint is damaged") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise CheckpointError(f"{mpath}: not an elleci manifest (expected format {FORMAT!r} and a 'files' table)")
    return manifest


def verify_dir(path: str | os.PathLike, *, required=(), check_hashes: bool = True,
               missing_ok: bool = False) -> dict | None:
    """Check that `path` is a complete checkpoint: its manifest exists, every listed file exists with the
    listed size (and SHA-256, unless `check_hashes=False`), and every name in `required` is listed.
    Returns the manifest. Raises `CheckpointError` naming the path and each problem; FileNotFoundError
    when `path` is not a directory. `missing_ok=True` returns None for a directory without a manifest
    (one written by another tool, e.g. a PEFT adapter, or by elleci before manifests existed)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    manifest = read_manifest(path)
    if manifest is None:
        if missing_ok:
            return None
        raise CheckpointError(f"{path}: no {MANIFEST}, so it is not a complete elleci checkpoint (an interrupted "
                              "save, a directory written by hand, or one saved before elleci wrote manifests)")
    problems = [f"{name} is not part of it" for name in required if name not in manifest["files"]]
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != entry.get("size"):
            problems.append(f"{name} has {f.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif check_hashes and file_digest(f) != entry.get("sha256"):
            problems.append(f"{name} does not match its SHA-256 in the manifest (changed or damaged)")
    if problems:
        raise CheckpointError(f"{path}: incomplete or inconsistent checkpoint: " + "; ".join(problems))
    return manifest


def locate_dir(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; else the newest aside copy `.<name>.old-*` left by a save killed while
    replacing it (with a warning naming both); else FileNotFoundError."""
    path = Path(path)
    if path.exists():
        return path
    for aside in asides(path):
        if read_manifest(aside) is not None:
            warnings.warn(f"{path} is missing: a save replacing it was interrupted; reading the previous "
                          f"complete copy {aside}", stacklevel=2)
            return aside
    raise FileNotFoundError(f"checkpoint directory not found: {path}")


# ---- writing ---------------------------------------------------------------------------------------

def _check_target(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target} exists and is not a directory; a checkpoint is a directory")
    if target.is_dir() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        names = sorted(p.name for p in target.iterdir())[:6]
        raise FileExistsError(f"{target} exists and is not an elleci checkpoint (no {MANIFEST}; it holds {names}): "
                              "refusing to replace it and delete those files. Save into a new or empty directory, "
                              "or delete it first (a checkpoint saved before elleci wrote manifests too)")


@contextmanager
def publish_dir(path: str | os.PathLike):
    """Yield a fresh temporary sibling directory of `path`; on normal exit write its manifest last and
    publish it at `path` atomically (the module docstring gives the protocol); on an exception remove it.

        with publish_dir(out / "checkpoint-100") as tmp:
            safetensors.torch.save_file(state, tmp / "model.safetensors")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)                           # also puts back an aside whose target is missing
    _check_target(target)
    tmp = side_path(target, "tmp")
    os.mkdir(tmp)                                         # mode 0o777 & ~umask (mkdtemp would force 0o700)
    _ACTIVE.add(str(tmp))
    try:
        yield tmp
        write_manifest(tmp)
        if target.exists():
            aside = side_path(target, "old")
            _ACTIVE.add(str(aside))
            try:
                os.rename(target, aside)
                os.rename(tmp, target)
                _fsync_dir(target.parent)
                shutil.rmtree(aside, ignore_errors=True)
            finally:
                _ACTIVE.discard(str(aside))
        else:
            os.rename(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(str(tmp))


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a checkpoint directory without ever exposing a half-deleted one: rename it aside to
    `.<name>.del-*` (one atomic step), then delete that. A kill in between leaves the aside for the next
    `publish_dir` in that parent to remove."""
    path = Path(path)
    if not path.exists():
        return
    gone = side_path(path, "del")
    os.rename(path, gone)
    _fsync_dir(path.parent)
    shutil.rmtree(gone, ignore_errors=True)


# ---- finding the newest complete checkpoint ----------------------------------------------------------

def checkpoint_steps(out_dir: str | os.PathLike, prefix: str = "checkpoint-") -> dict[int, Path]:
    """step -> directory for every `out_dir/<prefix><step>` (or its aside copy when it is missing)."""
    out_dir, found, missing = Path(out_dir), {}, set()
    if not out_dir.is_dir():
        return found
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    for p in out_dir.iterdir():
        m = _SIDE.match(p.name)
        name = p.name if m is None else m["name"]
        step = pattern.fullmatch(name)
        if step is None or not p.is_dir():
            continue
        if m is None:
            found[int(step[1])] = p
        elif m["kind"] == "old" and not (out_dir / name).exists():
            missing.add(name)
    for name in missing:
        found[int(pattern.fullmatch(name)[1])] = asides(out_dir / name)[0]
    return found


def latest_checkpoint(out_dir: str | os.PathLike, prefix: str = "checkpoint-", *,
                      check_hashes: bool = True) -> Path | None:
    """The newest complete `out_dir/<prefix><step>` directory, or None when there is none.

    Incomplete or inconsistent ones (`verify_dir` fails) are skipped with a warning naming each path and
    its problem, so a resume falls back to the previous complete checkpoint and never mixes two. Temporaries
    and deletions left by a killed process are removed first (a run killed while deleting an old checkpoint
    may resume with nothing left to save, so no later `publish_dir` would clean them up).
    """
    remove_stale(out_dir, kinds=("tmp", "del"))
    for step, path in sorted(checkpoint_steps(out_dir, prefix).items(), reverse=True):
        try:
            verify_dir(path, check_hashes=check_hashes)
        except (CheckpointError, FileNotFoundError) as e:
            warnings.warn(f"skipping incomplete checkpoint: {e}", stacklevel=2)
            continue
        if path.name != f"{prefix}{step}":
            warnings.warn(f"{Path(out_dir) / f'{prefix}{step}'} is missing (a save replacing it was interrupted); "
                          f"using the complete copy {path}", stacklevel=2)
        return path
    return None
