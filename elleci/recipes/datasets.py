"""Each stage's data: read a JSONL file, check every record, encode it; errors say `file:line: what`.

    items, skipped = sft_items("chat.jsonl", "auto", tok, max_length=1024)     # [(ids, labels)]
    items, skipped = pair_items("pairs.jsonl", tok, max_length=1024)            # {"chosen", "rejected", ...}
    items, skipped = feedback_items("fb.jsonl", "binary", tok, max_length=1024) # {"response", "target"}
    records = prompt_records("prompts.jsonl")                                   # {"prompt": messages, ...}

A record whose prompt alone leaves no room for a response token within `max_length` is skipped (counted
and reported with its first file:line), not an error: a long prompt is not a malformed line. Responses
longer than the room left are cut at the right, as `elleci.algos.chat` documents.
"""
from __future__ import annotations

from collections.abc import Callable

from elleci.algos.chat import as_messages
from elleci.algos.feedback import parse_binary, parse_pairwise, parse_prompt, parse_scored
from elleci.algos.logprobs import IGNORE_INDEX
from elleci.data import SFT_FORMATS, detect_sft_format, read_jsonl, validate_messages


class Skipped:
    """Records left out because their prompt is too long: how many and where the first was."""

    def __init__(self):
        self.count, self.first = 0, None

    def add(self, where: str) -> None:
        self.count += 1
        self.first = self.first or where

    def __str__(self) -> str:
        return f"{self.count} record(s) skipped: prompt longer than [data] max_length (first at {self.first})" \
            if self.count else ""


def _records(path, max_examples: int):
    for n, (lineno, rec) in enumerate(read_jsonl(path)):
        if max_examples and n >= max_examples:
            return
        yield lineno, rec


def _each(path, max_examples: int, fn: Callable) -> list:
    """fn(rec, where) for every record; its ValueError gets the file:line prefix."""
    out = []
    for lineno, rec in _records(path, max_examples):
        try:
            got = fn(rec, f"{path}:{lineno}")
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        if got is not None:
            out.extend(got)
    if not out:
        raise ValueError(f"{path}: no usable records (an empty file, or every prompt longer than max_length)")
    return out


def encode_turn(tok, prompt, response: str, max_length: int):
    """(ids, labels) of one prompt + response, or None when the prompt leaves no room (module docstring)."""
    p = tok.apply_chat_template(as_messages(prompt), add_generation_prompt=True)
    if len(p) >= max_length:
        return None
    r = (tok.encode(response) + [tok.im_end_id])[: max_length - len(p)]
    return p + r, [IGNORE_INDEX] * len(p) + r


def sft_items(path, fmt: str, tok, max_length: int, max_examples: int = 0):
    """One (ids, labels) per assistant turn (chat / Alpaca / OpenOrca / auto-detected per record)."""
    skipped = Skipped()

    def parse(rec, where):
        kind = detect_sft_format(rec) if fmt == "auto" else fmt
        if kind is None:
            raise ValueError(f"unrecognised SFT record with keys {sorted(rec)}; expected 'messages' (chat), "
                             "'instruction'+'output' (alpaca) or 'question'+'response' (openorca)")
        msgs = validate_messages(SFT_FORMATS[kind](rec))
        turns = [(msgs[:i], m["content"]) for i, m in enumerate(msgs) if m["role"] == "assistant" and i > 0]
        if not turns:
            raise ValueError("conversation has no assistant turn after a prompt: nothing to train on")
        out = []
        for prompt, response in turns:
            ex = encode_turn(tok, prompt, response, max_length)
            if ex is None:
                skipped.add(where)
            else:
                out.append(ex)
        return out
    return _each(path, max_examples, parse), skipped


def pair_items(path, tok, max_length: int, max_examples: int = 0, *, keep_text: bool = False):
    """{"chosen": (ids, labels), "rejected": (ids, labels)[, ref_*_logps]} per pairwise record."""
    skipped = Skipped()

    def parse(rec, where):
        r = parse_pairwise(rec)
        c, j = (encode_turn(tok, r["prompt"], r[k], max_length) for k in ("chosen", "rejected"))
        if c is None or j is None:
            skipped.add(where)
            return None
        item = {"chosen": c, "rejected": j, **{k: r[k] for k in ("ref_chosen_logps", "ref_rejected_logps") if k in r}}
        if keep_text:
            item["record"] = r
        return [item]
    return _each(path, max_examples, parse), skipped


def feedback_items(path, kind: str, tok, max_length: int, max_examples: int = 0, *, min_score: float = 0.0,
                   max_score: float = 0.0, kl_pairs: bool = False):
    """{"response": (ids, labels), "target": label or score[, ref_logps]} per binary / scored record.
    Scores are mapped by (s - min_score) / (max_score - min_score) unless both are 0 (then in [0, 1]).
    kl_pairs=True (KTO's KL baseline) adds "kl_response": record i's prompt with record i − 1's completion
    (cyclically, in file order), as `elleci.algos.preference.encode_feedback(..., kl_pairs=True)` does."""
    skipped = Skipped()
    lo, hi = (min_score, max_score) if (min_score, max_score) != (0.0, 0.0) else (None, None)

    def parse(rec, where):
        r = parse_binary(rec) if kind == "binary" else parse_scored(rec, lo, hi)
        ex = encode_turn(tok, r["prompt"], r["completion"], max_length)
        if ex is None:
            skipped.add(where)
            return None
        item = {"response": ex, "target": float(r["label" if kind == "binary" else "score"])}
        if "ref_logps" in r:
            item["ref_logps"] = r["ref_logps"]
        if kl_pairs:
            item["_text"] = (r["prompt"], r["completion"])
        return [item]
    items = _each(path, max_examples, parse)
    if kl_pairs:
        if len(items) < 2:
            raise ValueError(f"{path}: KTO's KL baseline needs at least 2 records (prompts paired with other "
                             "records' completions)")
        texts = [it.pop("_text") for it in items]
        for i, it in enumerate(items):
            it["kl_response"] = encode_turn(tok, texts[i][0], texts[i - 1][1], max_length)
    return items, skipped


def preference_records(path, max_examples: int = 0) -> list[dict]:
    """Reward-model data: soft {"prompt", "response_a", "response_b", "p_a"} or pairwise {"prompt", "chosen",
    "rejected"} (read as p_a = 1), one format per record."""
    def parse(rec, where):
        if "chosen" in rec or "rejected" in rec:
            r = parse_pairwise(rec)
            return [{"prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"], "p_a": 1.0}]
        prompt = parse_prompt(rec)
        for k in ("response_a", "response_b"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"field {k!r} must be a string (or give 'chosen' and 'rejected'); keys found: "
                                 f"{sorted(rec)}")
        p = rec.get("p_a")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"field 'p_a' must be a number in [0, 1] (P(response_a is better)), got {p!r}")
        return [{"prompt": prompt, "response_a": rec["response_a"], "response_b": rec["response_b"], "p_a": float(p)}]
    return _each(path, max_examples, parse)


def prompt_records(path, max_examples: int = 0, required: tuple[str, ...] = ()) -> list[dict]:
    """Online-stage prompts: each record's "prompt" (a string or chat messages ending with a user turn) is
    parsed to messages; the other fields (answers, passages) are kept for the verifier."""
    def parse(rec, where):
        for k in required:
            if not isinstance(rec.get(k), str):
                raise ValueError(f"field {k!r} must be a string; keys found: {sorted(rec)}")
        return [{**rec, "prompt": parse_prompt(rec)}]
    return _each(path, max_examples, parse)
