"""Generation tasks scored by a verifier: prompts from a local JSONL, one completion each, a function says
how good it is.

    records = read_generation("configs/eval/data/gen_it.jsonl")
    metrics, samples = evaluate_generation(model, tok, records, verifier="elleci.eval.verified_generation:exact_match")

A record: {"prompt": str, optional "until": [str, ...], anything else the verifier reads (e.g. "answer")}.
The verifier is `module:function`, called as function(record, completion) -> bool or float in [0, 1]
(record first, like `elleci.tasks.arithmetic.verify(problem, text)`); `score` is its mean over records.
Completions are greedy unless temperature > 0, at most `max_new_tokens` tokens, cut at the record's (or the
task's) stop strings: default "\\n" for raw prompts, none with chat=True (the turn ends at <|im_end|>).
Built-in verifiers: `exact_match` (normalised equality with record["answer"]) and `contains_answer`
(the normalised answer occurs in the completion); record["answer"] may also be a list of accepted answers.
Normalisation: casefold, strip spaces and final punctuation, collapse inner whitespace.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from ..data import read_jsonl
from .generate import generate_until


def read_generation(path, limit: int | None = None) -> list[dict]:
    """Records with a string "prompt" (and, if present, a list of strings "until"); errors name file:line."""
    records = []
    for line, rec in read_jsonl(path):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ValueError(f"{path}:{line}: 'prompt' must be a non-empty string")
        until = rec.get("until")
        if until is not None and not (isinstance(until, list) and all(isinstance(s, str) for s in until)):
            raise ValueError(f"{path}:{line}: 'until' must be a list of strings")
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def resolve_verifier(spec: str | Callable) -> Callable:
    """A callable from "module:function" (or the callable itself)."""
    if callable(spec):
        return spec
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"verifier {spec!r} must be 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier {spec!r} not found ({e})") from None
    if not callable(fn):
        raise ValueError(f"verifier {spec!r} is not callable")
    return fn


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip().rstrip(".!?;:,").strip()


def _answers(record: Mapping) -> list[str]:
    answer = record.get("answer")
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"record needs 'answer' (a string or a list of strings) for this verifier: {dict(record)}")
    return [normalise(a) for a in answers]


def exact_match(record: Mapping, completion: str) -> bool:
    """The normalised completion equals a normalised answer."""
    return normalise(completion) in _answers(record)


def contains_answer(record: Mapping, completion: str) -> bool:
    """A normalised answer occurs, as whole words, in the normalised completion."""
    text = normalise(completion)
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text) for a in _answers(record))


def evaluate_generation(model, tokenizer, records: Sequence[Mapping], *, verifier: str | Callable,
                        chat: bool = False, until: Sequence[str] | None = None, max_new_tokens: int = 64,
                        temperature: float = 0.0, seed: int = 0, batch_size: int = 16
                        ) -> tuple[dict[str, float], list[dict]]:
    """(metrics {"score"}, one sample per record with its completion and score)."""
    fn = resolve_verifier(verifier)
    default_until = list(until) if until is not None else ([] if chat else ["\n"])
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
                   for r in records]
    else:
        prompts = [tokenizer.encode(r["prompt"]) for r in records]
    stops = [r.get("until", default_until) for r in records]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed) if temperature > 0 else None
    texts = generate_until(model, tokenizer, prompts, stops, max_new_tokens=max_new_tokens, temperature=temperature,
                           batch_size=batch_size, generator=gen)
    scores = []
    for r, t in zip(records, texts):
        s = float(fn(r, t))
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"verifier {verifier!r} returned {s} for prompt {r['prompt'][:60]!r}; "
                             "expected a value in [0, 1]")
        scores.append(s)
    samples = [{"prompt": r["prompt"], "completion": t, "score": s} for r, t, s in zip(records, texts, scores)]
    return {"score": sum(scores) / len(scores)}, samples
