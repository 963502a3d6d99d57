"""Perplexity of a local text corpus (JSONL `text` field or a .txt file), as lm-eval's wikitext reports it.

    docs = read_text("configs/eval/data/testo_it.txt")          # elleci.data.read_text: .txt = paragraphs
    metrics, samples = evaluate_perplexity(model, tok, docs, max_length=2048)

Each document d is scored whole with lm-eval's rolling windows after the EOS prefix token
(`elleci.eval.scoring.score_rolling`): LL_d = Σ_t log p(x_t | x_<t), each token predicted once. Over the corpus,

    token_perplexity = exp(−Σ_d LL_d / Σ_d tokens_d)
    word_perplexity  = exp(−Σ_d LL_d / Σ_d words_d)         words_d = len(re.split(r"\\s+", d))  (lm-eval's count)
    byte_perplexity  = exp(−Σ_d LL_d / Σ_d bytes_d)         UTF-8 bytes
    bits_per_byte    = −Σ_d LL_d / (Σ_d bytes_d · ln 2)

Word and byte figures compare across tokenizers; token perplexity only between models sharing one.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .scoring import score_rolling


def count_words(doc: str) -> int:
    return len(re.split(r"\s+", doc))


def evaluate_perplexity(model, tokenizer, docs: Sequence[str], *, max_length: int = 2048, batch_size: int = 16
                        ) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one sample per document with its log-likelihood and counts)."""
    if not docs:
        raise ValueError("perplexity needs at least one document")
    tokens = [tokenizer.encode(d) for d in docs]
    if any(len(t) == 0 for t in tokens):
        raise ValueError(f"document {next(i for i, t in enumerate(tokens) if not t)} is empty")
    lls = score_rolling(model, tokens, prefix_token=tokenizer.eos_id, max_length=max_length, batch_size=batch_size)
    n_tok, n_words = sum(map(len, tokens)), sum(count_words(d) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    total = sum(lls)
    metrics = {"token_perplexity": math.exp(-total / n_tok), "word_perplexity": math.exp(-total / n_words),
               "byte_perplexity": math.exp(-total / n_bytes), "bits_per_byte": -total / (n_bytes * math.log(2))}
    samples = [{"loglikelihood": ll, "tokens": len(t), "words": count_words(d), "bytes": len(d.encode("utf-8"))}
               for d, t, ll in zip(docs, tokens, lls)]
    return metrics, samples
