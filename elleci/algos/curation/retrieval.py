"""Passage retrieval for corpus distillation (`elleci.algos.curation.distill`): BM25 in plain NumPy, or the model's
own embeddings.

    index = BM25(["Anna lives in Milan.", "Marco has a dog."])          # k1 = 1.5, b = 0.75
    index.scores("Where does Anna live?")                              # [N] float64
    retriever = BM25Retriever(chunks)                                   # chunks: objects with .id and .text
    retriever(["Where does Anna live?"], k=2)                           # [[(chunk id, score), ...]]
    dense = EmbeddingRetriever(model, tokenizer, chunks)                # mean-pooled hidden states, cosine

BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009; the
non-negative IDF of Lucene) scores a document D for a query Q = (q_1 … q_n):

    score(D, Q) = Σ_i IDF(q_i) · f(q_i, D) · (k1 + 1) / (f(q_i, D) + k1 · (1 − b + b · |D| / avgdl))   (Eq. 1)
    IDF(q)      = ln(1 + (N − n(q) + 0.5) / (n(q) + 0.5))                                          (Eq. 2)

    f(q, D)  occurrences of term q in D          |D|     D's length in terms
    N        documents in the index              avgdl   mean |D| over the index
    n(q)     documents that contain q            k1, b   term-frequency saturation, length normalisation

A query term repeated in Q counts once per occurrence (the sum runs over Q's tokens). k1 = 0 scores
Σ IDF over the query terms D contains; b = 0 switches length normalisation off.

Terms are lower-cased words (`tokenize`), by default reduced by Harman's S-stemmer (Harman, "How
effective is suffixing?", JASIS 1991: "-ies" → "-y", "-es" → "-e", "-s" → "", with its exceptions), so
"lives" matches "live". m-KAILIN's retrieval agent (arXiv 2504.19565) is dense: a shared encoder,
score exp(e(r)ᵀe(q)), top-k; `EmbeddingRetriever` is that with the policy's own final hidden states.

Differences from the paper (m-KAILIN's retriever):
1. BM25 is the default; the dense option embeds with the LM being distilled (mean of its final-normed
   hidden states over the text's tokens, L2-normalised), not a separate BiomedBERT encoder.
2. Dense scores are the cosine eᵀq of unit vectors; exp(·) is monotone, so the top-k is the same.
3. Ties rank the earlier chunk first, so retrieval is deterministic for a fixed index.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")


def s_stem(word: str) -> str:
    """Harman's S-stemmer: "ies" → "y" (not after e/a), "es" → "e" (not after a/e/o), "s" → "" (not after u/s)."""
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def tokenize(text: str, *, stem: bool = True) -> list[str]:
    """Lower-cased alphanumeric words of `text`, S-stemmed when `stem`."""
    words = _WORD.findall(text.lower())
    return [s_stem(w) for w in words] if stem else words


class BM25:
    """A BM25 index over `documents` (strings, or token lists when `tokenizer=None`)."""

    def __init__(self, documents: Sequence[str | Sequence[str]], *, k1: float = 1.5, b: float = 0.75,
                 tokenizer: Callable[[str], list[str]] | None = tokenize):
        if not documents:
            raise ValueError("BM25 needs at least one document")
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b, self.tokenizer = k1, b, tokenizer
        docs = [list(tokenizer(d)) if tokenizer is not None else list(d) for d in documents]
        self.n_docs = len(docs)
        self.lengths = np.array([len(d) for d in docs], dtype=np.float64)           # [N] |D|
        self.avgdl = float(self.lengths.mean()) or 1.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, d in enumerate(docs):
            for term, f in Counter(d).items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(f)
        self.postings = {t: (np.array(ids), np.array(tfs, dtype=np.float64)) for t, (ids, tfs) in postings.items()}
        self.idf = {t: self.term_idf(len(ids)) for t, (ids, _) in self.postings.items()}
        self.norm = k1 * (1.0 - b + b * self.lengths / self.avgdl)                  # [N] Eq. 1's denominator term

    def term_idf(self, n_q: int) -> float:
        """IDF of a term found in n_q of the N documents."""
        return math.log(1.0 + (self.n_docs - n_q + 0.5) / (n_q + 0.5))                # Eq. 2

    def scores(self, query: str | Sequence[str]) -> np.ndarray:
        """score(D, query) for every document → [N] float64."""
        terms = self.tokenizer(query) if self.tokenizer is not None and isinstance(query, str) else list(query)
        out = np.zeros(self.n_docs)
        for term in terms:
            if term not in self.postings:
                continue
            ids, tf = self.postings[term]
            out[ids] += self.idf[term] * tf * (self.k1 + 1.0) / (tf + self.norm[ids])  # Eq. 1
        return out

    def top_k(self, query: str | Sequence[str], k: int) -> list[tuple[int, float]]:
        """The k best (document index, score), best first; ties keep index order."""
        return rank(self.scores(query), k)


def rank(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(index, score) of the k highest scores, best first, ties by index (a stable sort)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


def _chunk_fields(chunks: Sequence) -> tuple[list[str], list[str]]:
    if not chunks:
        raise ValueError("a retriever needs at least one chunk")
    ids, texts = [c.id for c in chunks], [c.text for c in chunks]
    if len(set(ids)) != len(ids):
        raise ValueError("chunk ids must be unique")
    return ids, texts


class BM25Retriever:
    """The `Retriever` of `elleci.algos.curation.distill` over BM25: `retriever(queries, k)` → per query the k best
    (chunk id, score)."""

    def __init__(self, chunks: Sequence, *, k1: float = 1.5, b: float = 0.75, stem: bool = True):
        self.ids, texts = _chunk_fields(chunks)
        self.index = BM25(texts, k1=k1, b=b, tokenizer=lambda t: tokenize(t, stem=stem))
        self.name = f"bm25(k1={k1:g},b={b:g}{',stem' if stem else ''})"

    def __call__(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        return [[(self.ids[i], s) for i, s in self.index.top_k(q, k)] for q in queries]


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Unit-norm mean of the model's final-normed hidden states over each text's tokens → [N, d] float32.

    Rows are right-padded; a causal model computes a row's real positions from that row's tokens alone,
    so the padding (masked out of the mean) changes nothing."""
    device = next(model.parameters()).device
    was_training, out = model.training, []
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer.encode(t) or [tokenizer.eos_id] for t in texts[start:start + batch_size]]
            x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long, device=device)
            mask = torch.zeros(x.shape, device=device)                                # [B, L]
            for r, row in enumerate(ids):
                x[r, :len(row)] = torch.as_tensor(row, device=device)
                mask[r, :len(row)] = 1.0
            h = model.hidden_states(x).float()                                        # [B, L, d]
            mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)           # [B, d]
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


class EmbeddingRetriever:
    """Dense retrieval with the LM's own embeddings (`embed_texts`): score = cosine(e(chunk), e(query))."""

    def __init__(self, model, tokenizer, chunks: Sequence, *, batch_size: int = 32, name: str = "lm-embeddings"):
        self.ids, texts = _chunk_fields(chunks)
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.matrix = embed_texts(model, tokenizer, texts, batch_size=batch_size).double().numpy()   # [N, d]

    def __call__(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        if not queries:
            return []
        q = embed_texts(self.model, self.tokenizer, queries, batch_size=self.batch_size).double().numpy()  # [Q, d]
        sims = q @ self.matrix.T                                                        # [Q, N] e(q)ᵀe(r)
        return [[(self.ids[i], s) for i, s in rank(row, k)] for row in sims]
