"""Data: JSONL readers, SFT format conversion to chat messages, and a resumable pretraining stream.

Readers fail loudly: every malformed record raises `ValueError("path:LINE: what is wrong")` with the
1-based line number, so a bad row in a million-line file is found with `sed -n LINEp path`.

    docs = read_text("corpus.jsonl")                      # ["doc one", "doc two", ...]
    tokens = pack_documents([tok.encode(d) for d in docs], eos_id=tok.eos_id)
    batches = TokenBatches(tokens, seq_len=512, batch_size=8, seed=0)
    x, y = batches.batch(step)                            # same (x, y) for the same (seed, step)

    convs = read_sft("alpaca.jsonl")  # [[{"role": "user", "content": ...}, {"role": "assistant", ...}], ...]

SFT records are normalised to a list of `{"role", "content"}` messages and nothing more: turning
messages into tokens (ChatML, folding a system turn into the user turn as the original model was
trained) is the tokenizer's chat template's job, not the reader's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from elleci._io import read_lines, read_text_file
from elleci.model.tokenizer import CHAT_ROLES as ROLES, check_messages
Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------------------------
# JSONL and plain text

def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for every non-blank line of a JSONL file (1-based numbers).

    Raises `ValueError("data.jsonl:7: invalid JSON (...)")` for a line that does not parse,
    `ValueError("data.jsonl:7: expected a JSON object, got list")` for a line that is not an object and
    `ValueError("data.jsonl:7: not valid UTF-8 (...)")` for bytes that are not UTF-8. A BOM is dropped.
    """
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_text(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Documents of a pretraining corpus, as a list of strings.

    - `*.jsonl` / `*.json` / anything else: JSONL, one document per record, taken from `record[field]`
      (a missing or non-string field raises `ValueError` with file:line).
    - `*.txt`: one document per paragraph, paragraphs separated by one or more blank lines; lines
      inside a paragraph are kept with their newlines and the paragraph is stripped of surrounding
      whitespace. (A file without blank lines is therefore a single document.) A leading BOM is dropped;
      bytes that are not UTF-8 raise `ValueError("path:LINE: ...")`.
    """
    if Path(path).suffix == ".txt":
        return _paragraphs(read_text_file(path))
    docs = []
    for lineno, rec in read_jsonl(path):
        value = rec.get(field)
        if not isinstance(value, str):
            what = "missing" if field not in rec else f"not a string ({type(value).__name__})"
            raise ValueError(f"{path}:{lineno}: field {field!r} is {what}; keys found: {sorted(rec)}")
        docs.append(value)
    return docs


def _paragraphs(text: str) -> list[str]:
    """Split text on blank lines (lines holding only whitespace count as blank)."""
    paras, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paras.append("\n".join(current).strip())
            current = []
    if current:
        paras.append("\n".join(current).strip())
    return paras


# ----------------------------------------------------------------------------------------------
# SFT: chat / Alpaca / OpenOrca -> messages

def _str_field(rec: dict, key: str, required: bool = True) -> str:
    """`rec[key]` as a string; absent optional fields (and JSON null) read as ""."""
    if key not in rec or rec[key] is None:
        if required:
            raise ValueError(f"missing field {key!r}; keys found: {sorted(rec)}")
        return ""
    if not isinstance(rec[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def validate_messages(messages) -> Messages:
    """Check a chat: a non-empty list of `{"role", "content"}` dicts, role in system/user/assistant,
    content a string, a system message only first (and followed by a user message). Returns the
    messages unchanged. The rules are the chat template's (`elleci.model.tokenizer.check_messages`)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    check_messages(messages)
    return messages


def chat_to_messages(rec: dict) -> Messages:
    """`{"messages": [...]}` -> the validated messages, each reduced to its role and content."""
    if "messages" not in rec:
        raise ValueError(f"missing field 'messages'; keys found: {sorted(rec)}")
    msgs = validate_messages(rec["messages"])
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def alpaca_to_messages(rec: dict) -> Messages:
    """Alpaca `{instruction, input, output}` -> [user, assistant].

    user = instruction + "\\n\\n" + input   (just `instruction` when input is absent or blank)
    assistant = output
    """
    instruction, inp = _str_field(rec, "instruction"), _str_field(rec, "input", required=False)
    user = instruction + "\n\n" + inp if inp.strip() else instruction
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": _str_field(rec, "output")}]


def openorca_to_messages(rec: dict) -> Messages:
    """OpenOrca `{system_prompt, question, response}` -> [system (if non-blank), user, assistant].

    The system prompt stays its own message; folding it into the user turn (`system + "\\n\\n" +
    question`, as the original model saw it) is done by the tokenizer's chat template.
    """
    system = _str_field(rec, "system_prompt", required=False)
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    return msgs + [{"role": "user", "content": _str_field(rec, "question")},
                   {"role": "assistant", "content": _str_field(rec, "response")}]


SFT_FORMATS = {"chat": chat_to_messages, "alpaca": alpaca_to_messages, "openorca": openorca_to_messages}


def detect_sft_format(rec: dict) -> str | None:
    """Format of one record by its keys: `messages` -> chat; `instruction`+`output` -> alpaca;
    `question`+`response` -> openorca; otherwise None."""
    if "messages" in rec:
        return "chat"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "question" in rec and "response" in rec:
        return "openorca"
    return None


def read_sft(path: str | os.PathLike, format: str = "auto") -> list[Messages]:
    """Read an SFT JSONL file as a list of conversations (each a list of messages).

    `format` is "chat", "alpaca", "openorca", or "auto" (detected per record, so a file may mix
    formats). Any bad record raises `ValueError("path:LINE: ...")`; an unrecognised one lists its keys, and a
    conversation without an assistant turn after a prompt (nothing to train on) is refused here, by line.
    """
    if format != "auto" and format not in SFT_FORMATS:
        raise ValueError(f"unknown SFT format {format!r}; expected 'auto' or one of {sorted(SFT_FORMATS)}")
    convs = []
    for lineno, rec in read_jsonl(path):
        fmt = detect_sft_format(rec) if format == "auto" else format
        if fmt is None:
            raise ValueError(f"{path}:{lineno}: unrecognised SFT record with keys {sorted(rec)}; "
                             "expected 'messages' (chat), 'instruction'+'output' (alpaca) "
                             "or 'question'+'response' (openorca)")
        try:
            conv = SFT_FORMATS[fmt](rec)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {fmt} record: {e}") from None
        if not any(m["role"] == "assistant" for m in conv[1:]):
            raise ValueError(f"{path}:{lineno}: {fmt} record has no assistant turn after a prompt: nothing to "
                             f"train on (roles: {[m['role'] for m in conv]})")
        convs.append(conv)
    return convs


# ----------------------------------------------------------------------------------------------
# Pretraining stream

def pack_documents(docs: list[list[int]], eos_id: int) -> torch.Tensor:
    """Concatenate token lists with EOS after each: [d0..., eos, d1..., eos, ...] as a 1-D LongTensor.

    Like the original, there is no attention reset at document boundaries: the EOS is the only
    separator a model sees, and windows sampled from the stream may span documents.
    """
    out = []
    for doc in docs:
        out.extend(doc)
        out.append(eos_id)
    return torch.tensor(out, dtype=torch.long)


def _mix(seed: int, step: int) -> int:
    """A 63-bit seed for (seed, step): SplitMix64 finaliser over seed*2^32 + step, so that nearby
    (seed, step) pairs give unrelated generator states."""
    z = (seed * 0x1_0000_0000 + step + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class TokenBatches:
    """Random windows from a token stream; the batch for a step depends only on (seed, step).

        x, y = TokenBatches(tokens, seq_len=T, batch_size=B, seed=s).batch(step)   # [B, T] each

    Each row is a window w = tokens[i : i + T + 1] with i uniform in [0, N - T - 1];
    x = w[:-1], y = w[1:] (next-token targets). There is no hidden iterator state, so a run resumed
    at step k sees exactly the batches k, k+1, ... of the uninterrupted run: nothing to checkpoint.
    Counting `step` in micro-batches or optimizer steps is the caller's choice; keep it consistent.
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int = 0):
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"token stream has {tokens.numel()} tokens; need at least seq_len + 1 = "
                             f"{seq_len + 1} for one (input, target) window")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both [batch_size, seq_len] LongTensors, for this step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = torch.Generator().manual_seed(_mix(self.seed, step))
        n_starts = self.tokens.numel() - self.seq_len  # valid starts: 0 .. N - T - 1
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=g)
        window = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    __call__ = batch


DOCUMENT_SUFFIXES = (".txt", ".md")


def read_documents(folder, suffixes=DOCUMENT_SUFFIXES) -> list[tuple[str, str]]:
    """(doc_id, text) of every file under `folder` with one of `suffixes`, sorted by doc_id (the path
    relative to `folder`, with "/")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"document folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    return [(p.relative_to(folder).as_posix(), read_text_file(p)) for p in paths]
