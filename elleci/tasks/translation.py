"""IT→EN word translation: a second verifiable skill for merging, beside arithmetic.

The words are the bilingual lexicon's pairs (`elleci.tasks.lexicon`). The knowledge comes from
pretraining, the format from fine-tuning:

    pretraining text   "In inglese cane si dice dog."  /  "In Italian dog is cane."   (every pair, both splits)
    SFT (TRAIN_PAIRS)  user "Translate to English: cane"  →  assistant "dog"
    evaluation         greedy answer on CONTROL_PAIRS (never in SFT), exact match after normalising

So held-out accuracy measures whether the model learnt to *use* what pretraining put in it for the
new format, not memorisation of the SFT words. (The pipeline's tiny CPU bases complete "In inglese X si
dice" correctly for only ~3% of the lexicon, so on them only the fine-tuned words are translated;
`examples/merge.py` scores those.)

    texts = pretraining_texts(PAIRS, seed=0)
    sft = sft_examples(TRAIN_PAIRS)
    report = evaluate(completer(model, tok), CONTROL_PAIRS)       # {"accuracy", "n", "correct"}
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence


Pair = tuple[str, str]            # (italian, english)
Messages = list[dict]

PROMPT = "Translate to English: {it}"
TEXT_TEMPLATES = ("In inglese {it} si dice {en}.", "In Italian {en} is {it}.",
                  "La parola {it} in inglese è {en}.", "The Italian word {it} means {en}.")


def _check(pairs: Sequence[Pair]) -> list[Pair]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no word pairs given")
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(w, str) and w.strip() for w in p)):
            raise ValueError(f"pair {i} is {p!r}; expected (italian, english), two non-empty strings")
    return pairs


def pretraining_texts(pairs: Sequence[Pair], seed: int = 0, repeats: int = 4, per_doc: int = 4) -> list[str]:
    """Plain-text documents stating every pair `repeats` times (templates drawn at random, `per_doc`
    sentences per document, shuffled): the pretraining corpus's share of bilingual word knowledge."""
    pairs = _check(pairs)
    rng = random.Random(f"translation-text/{seed}")
    sentences = [rng.choice(TEXT_TEMPLATES).format(it=it, en=en) for it, en in pairs for _ in range(repeats)]
    rng.shuffle(sentences)
    return [" ".join(sentences[i:i + per_doc]) for i in range(0, len(sentences), per_doc)]


def prompt_messages(italian: str) -> Messages:
    return [{"role": "user", "content": PROMPT.format(it=italian)}]


def sft_examples(pairs: Sequence[Pair]) -> list[Messages]:
    """[user "Translate to English: <it>", assistant "<en>"] conversations."""
    return [prompt_messages(it) + [{"role": "assistant", "content": en}] for it, en in _check(pairs)]


def normalise(text: str) -> str:
    """First line, lower case, surrounding spaces and punctuation stripped."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"^[\W_]+|[\W_]+$", "", first.lower())


def verify(pair: Pair, text: str) -> bool:
    """True iff the answer is exactly the English word (after `normalise`)."""
    return normalise(text) == pair[1].lower()


def evaluate(complete, pairs: Sequence[Pair], *, max_new_tokens: int = 8, batch_size: int = 64) -> dict:
    """Greedy exact-match accuracy: {"accuracy", "n", "correct"}; `complete` is a completion function
    (`elleci.testbed.completion.completer(model, tok)`)."""
    pairs = _check(pairs)
    texts = complete([prompt_messages(it) for it, _ in pairs], max_new_tokens=max_new_tokens, temperature=0.0,
                     batch_size=batch_size)
    ok = [verify(p, t) for p, t in zip(pairs, texts)]
    return {"accuracy": sum(ok) / len(ok), "n": len(ok), "correct": sum(ok)}
