"""Feedback data: JSONL readers for pairwise, binary and scored feedback, and an atomic JSONL writer.

One record per line; the prompt is a string (read as one user message) or a list of chat messages
ending with a user turn, and is always returned as messages:

    pairwise  {"prompt": ..., "chosen": "...", "rejected": "..."}            -> DPO, IPO, UNA-pairwise
    binary    {"prompt": ..., "completion": "...", "label": true | 1 | 0}     -> UNA-binary, KTO
    scored    {"prompt": ..., "completion": "...", "score": 7.5}             -> UNA-score

Optional precomputed reference log-probs travel with the data (DESIGN.md §5: the reference may be
"precomputed reference log-probs stored with the data"): `ref_chosen_logps` and `ref_rejected_logps`
(both or neither) for pairwise records, `ref_logps` for binary and scored records. They must be finite
numbers <= 0. Readers fail like `elleci.data`'s: `ValueError("path:LINE: what is wrong")`.

    pairs = read_pairwise("prefs.jsonl")
    rated = read_scored("ultrafeedback.jsonl", min_score=1, max_score=10)   # score -> (s - 1) / 9
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

from elleci._io import atomic_path
from elleci.data import read_jsonl, validate_messages

Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------------------------
# Field parsers (raise ValueError without the file:line prefix; `_read` adds it)

def _missing(rec: dict, key: str) -> ValueError:
    return ValueError(f"missing field {key!r}; keys found: {sorted(rec)}")


def parse_prompt(rec: dict) -> Messages:
    """`rec["prompt"]`: a string -> [{"role": "user", "content": s}]; a list of chat messages ->
    validated and reduced to role/content. The last message must be a user turn."""
    if "prompt" not in rec:
        raise _missing(rec, "prompt")
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise ValueError(f"field 'prompt' must be a string or a list of chat messages, "
                         f"got {type(prompt).__name__}")
    try:
        msgs = validate_messages(prompt)
    except ValueError as e:
        raise ValueError(f"field 'prompt': {e}") from None
    if msgs[-1]["role"] != "user":
        raise ValueError(f"field 'prompt' must end with a user message, ends with {msgs[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _text(rec: dict, key: str) -> str:
    if key not in rec:
        raise _missing(rec, key)
    if not isinstance(rec[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _number(rec: dict, key: str) -> float:
    """A finite JSON number (bool rejected) as float."""
    if key not in rec:
        raise _missing(rec, key)
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _ref_logps(rec: dict, out: dict, keys: tuple[str, ...]) -> dict:
    """Copy the optional reference log-prob fields `keys` into `out` (all of them or none)."""
    present = [k for k in keys if rec.get(k) is not None]
    if not present:
        return out
    if len(present) != len(keys):
        absent = [k for k in keys if k not in present]
        raise ValueError(f"field {present[0]!r} given without {absent[0]!r}; give both or neither")
    for k in keys:
        v = _number(rec, k)
        if v > 0:
            raise ValueError(f"field {k!r} is a log-probability and must be <= 0, got {v}")
        out[k] = v
    return out


def _read(path: str | os.PathLike, parse: Callable[[dict], dict]) -> list[dict]:
    """Apply `parse` to each record; its ValueError gets the `path:LINE:` prefix."""
    out = []
    for lineno, rec in read_jsonl(path):
        try:
            out.append(parse(rec))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------
# Readers

def parse_pairwise(rec: dict) -> dict:
    """One pairwise record -> {"prompt": messages, "chosen": str, "rejected": str[, ref_*_logps]}."""
    out = {"prompt": parse_prompt(rec), "chosen": _text(rec, "chosen"), "rejected": _text(rec, "rejected")}
    return _ref_logps(rec, out, ("ref_chosen_logps", "ref_rejected_logps"))


def parse_binary(rec: dict) -> dict:
    """One binary record -> {"prompt", "completion", "label": 0 | 1[, "ref_logps"]}.
    `label` must be a JSON bool or the integer 0 or 1."""
    if "label" not in rec:
        raise _missing(rec, "label")
    label = rec["label"]
    if not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
        raise ValueError(f"field 'label' must be true/false or 0/1, got {label!r}")
    out = {"prompt": parse_prompt(rec), "completion": _text(rec, "completion"), "label": int(label)}
    return _ref_logps(rec, out, ("ref_logps",))


def normalise_score(score: float, min_score: float | None = None, max_score: float | None = None) -> float:
    """(score − min)/(max − min) when a range is given (UltraFeedback's 1-10: (s − 1)/9), else score.
    Raises ValueError unless the result lies in [0, 1]."""
    if (min_score is None) != (max_score is None):
        raise ValueError("give both min_score and max_score, or neither")
    if min_score is not None:
        if not max_score > min_score:
            raise ValueError(f"max_score must be > min_score, got {min_score} and {max_score}")
        normalised = (score - min_score) / (max_score - min_score)
    else:
        normalised = score
    if not 0.0 <= normalised <= 1.0:
        if min_score is None:
            raise ValueError(f"score {score} is outside [0, 1] (pass min_score/max_score to normalise)")
        raise ValueError(f"score {score} normalises to {normalised:.4g} with range [{min_score}, "
                         f"{max_score}], outside [0, 1]")
    return normalised


def parse_scored(rec: dict, min_score: float | None = None, max_score: float | None = None) -> dict:
    """One scored record -> {"prompt", "completion", "score": float in [0, 1][, "ref_logps"]}."""
    score = normalise_score(_number(rec, "score"), min_score, max_score)
    out = {"prompt": parse_prompt(rec), "completion": _text(rec, "completion"), "score": score}
    return _ref_logps(rec, out, ("ref_logps",))


def read_pairwise(path: str | os.PathLike) -> list[dict]:
    """Pairwise preferences: a list of {"prompt": messages, "chosen": str, "rejected": str} (plus
    `ref_chosen_logps`/`ref_rejected_logps` floats when the file has them)."""
    return _read(path, parse_pairwise)


def read_binary(path: str | os.PathLike) -> list[dict]:
    """Binary (thumbs up/down) feedback: a list of {"prompt", "completion", "label": 0 | 1} (plus
    `ref_logps`); label 1 (true) marks a desired completion."""
    return _read(path, parse_binary)


def read_scored(path: str | os.PathLike, *, min_score: float | None = None,
                max_score: float | None = None) -> list[dict]:
    """Scored feedback: a list of {"prompt", "completion", "score": float in [0, 1]} (plus `ref_logps`).

    With `min_score`/`max_score` (both), raw scores are mapped by (s − min)/(max − min), e.g.
    UltraFeedback's 1-10 ratings with min_score=1, max_score=10 as in the UNA code. Without them the
    scores must already lie in [0, 1]. A score outside [0, 1] after normalisation raises with file:line.
    """
    if (min_score is None) != (max_score is None):
        raise ValueError("give both min_score and max_score, or neither")
    if min_score is not None and not max_score > min_score:
        raise ValueError(f"max_score must be > min_score, got {min_score} and {max_score}")
    return _read(path, lambda rec: parse_scored(rec, min_score, max_score))


# ----------------------------------------------------------------------------------------------
# Writer

def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write `records` one JSON object per line (UTF-8, non-ASCII kept), atomically: readers see the
    old file or the complete new one, never a partial write."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                if not isinstance(rec, dict):
                    raise TypeError(f"records must be dicts, got {type(rec).__name__}")
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
