"""Direct evaluation and re-weighting of synthetic data (stages 6 and 8 of `elleci.algos.curation.synth`).

Long et al., "On LLMs-Driven Synthetic Data Generation, Curation, and Evaluation", Findings of ACL 2024
(https://arxiv.org/abs/2406.15126), §Curation (re-weighting) and §Evaluation (direct: diversity, faithfulness).

    distinct_n(texts, 2)                        # unique bigrams / all bigrams, in (0, 1]
    self_similarity(texts, n=2)                 # mean pairwise Jaccard of word-bigram sets, in [0, 1]
    self_bleu(texts)                            # mean BLEU of each text against all the others
    w = inverse_frequency_weights(records, ["level"])          # every attribute cell weighs the same
    batch_fn = weighted_batches(items, w, 16, seed=0, collate_fn=sft_collate(pad_id))

Objectives:
    distinct-n      D_n = |unique n-grams| / |n-grams|          (over the corpus, n-grams within a text)
    self-sim        S_n = mean_{i<j} J(G_i, G_j)                 G_i = set of word n-grams of text i
    self-BLEU       mean_i BLEU(text_i; refs = all other texts)  BLEU = BP · exp(mean_k log p_k)
    inverse-freq    w_i = 1 / (C · count(c_i))                   Σ_i w_i = 1, each of the C cells gets 1/C
    score weights   w = softmax(s / T)

Glossary: n the n-gram order; J Jaccard similarity; p_k the clipped k-gram precision (smoothed +1/+1
for k > 1, Lin & Och 2004); BP = exp(1 − r/c) when the hypothesis length c is below the closest
reference length r, else 1; c_i the attribute cell (tuple of values) of record i; C the number of cells
present; s a per-record score (judge, verifier); T a temperature.

Differences from the survey:
1. Diversity is measured on words (lower-cased, whitespace-split), not model tokens or embeddings.
2. Re-weighting is by sampling: `weighted_batches` draws examples with probability w_i (with
   replacement), which equals a w-weighted loss in expectation; no learned (bilevel) weights.
3. self-BLEU and self-similarity use a seeded sample of texts/pairs when `max_texts`/`max_pairs` is smaller
   than the corpus.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

from elleci.algos.curation.synth_filters import jaccard, ngrams, words

__all__ = ["distinct_n", "self_similarity", "self_bleu", "pass_rate", "dataset_report", "normalise_weights",
           "inverse_frequency_weights", "score_weights", "with_weights", "weighted_batches"]


def _texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be strings")
    return texts


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """D_n: unique word n-grams over all word n-grams of the corpus (n-grams never cross texts)."""
    grams = [g for t in _texts(texts) for g in ngrams(t, n)]
    if not grams:
        raise ValueError(f"distinct_n: the texts have no word {n}-gram (empty corpus or texts shorter than n)")
    return len(set(grams)) / len(grams)


def _pairs(count: int, max_pairs: int | None, seed: int) -> list[tuple[int, int]]:
    total = count * (count - 1) // 2
    if max_pairs is None or max_pairs >= total:
        return [(i, j) for i in range(count) for j in range(i + 1, count)]
    rng, chosen = random.Random(f"synth/pairs/{seed}"), set()
    while len(chosen) < max_pairs:
        i, j = rng.sample(range(count), 2)
        chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)


def self_similarity(texts: Sequence[str], n: int = 2, *, max_pairs: int | None = 20000, seed: int = 0) -> float:
    """S_n: mean Jaccard of word n-gram sets over pairs of texts (1 = all the same, 0 = nothing shared)."""
    texts = _texts(texts)
    if len(texts) < 2:
        raise ValueError(f"self_similarity needs at least 2 texts, got {len(texts)}")
    sets = [set(ngrams(t, n)) for t in texts]
    pairs = _pairs(len(texts), max_pairs, seed)
    return sum(jaccard(sets[i], sets[j]) for i, j in pairs) / len(pairs)


def _bleu(hyp: list[str], ref_counts: list[Counter], ref_lengths: list[int], max_n: int) -> float:
    """Sentence BLEU of `hyp` against several references (clipped counts: max over references)."""
    if not hyp:
        return 0.0
    log_p = 0.0
    for k in range(1, max_n + 1):
        grams = Counter(tuple(hyp[i:i + k]) for i in range(len(hyp) - k + 1))
        total = sum(grams.values())
        match = sum(min(c, max(rc[k].get(g, 0) for rc in ref_counts)) for g, c in grams.items())
        if k == 1 and match == 0:
            return 0.0
        smooth = 0 if k == 1 else 1                                    # Lin & Och add-one for k > 1
        log_p += math.log((match + smooth) / (total + smooth)) if total + smooth else 0.0
    c = len(hyp)
    r = min(ref_lengths, key=lambda L: (abs(L - c), L))                # closest reference length
    bp = 1.0 if c >= r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p / max_n)


def self_bleu(texts: Sequence[str], max_n: int = 4, *, max_texts: int | None = 300, seed: int = 0) -> float:
    """mean_i BLEU(text_i; every other text as a reference): 1 = each text is copied elsewhere."""
    texts = _texts(texts)
    if len(texts) < 2:
        raise ValueError(f"self_bleu needs at least 2 texts, got {len(texts)}")
    if max_texts is not None and len(texts) > max_texts:
        texts = random.Random(f"synth/self_bleu/{seed}").sample(texts, max_texts)
    toks = [words(t) for t in texts]
    counts = [{k: Counter(tuple(w[i:i + k]) for i in range(len(w) - k + 1)) for k in range(1, max_n + 1)}
              for w in toks]
    lengths = [len(w) for w in toks]
    scores = [_bleu(toks[i], counts[:i] + counts[i + 1:], lengths[:i] + lengths[i + 1:], max_n)
              for i in range(len(texts))]
    return sum(scores) / len(scores)


def pass_rate(records: Sequence[dict], name: str = "verifier", threshold: float = 0.5) -> float:
    """Fraction of records with scores[name] ≥ threshold (faithfulness by a verifier or a judge)."""
    if not records:
        raise ValueError("pass_rate needs at least one record")
    missing = [r["id"] for r in records if name not in r.get("scores", {})]
    if missing:
        raise ValueError(f"{len(missing)} records have no score {name!r} (e.g. {missing[0]!r})")
    return sum(r["scores"][name] >= threshold for r in records) / len(records)


def dataset_report(records: Sequence[dict], text: Callable[[dict], str] = lambda r: r["output"], *,
                   score: str | None = None, ns: Sequence[int] = (1, 2, 3), sim_n: int = 2) -> dict:
    """Direct evaluation of a record set: count, distinct-n for each n, self-similarity, unique texts and,
    with `score`, the pass rate of that score."""
    texts = [text(r) for r in records]
    out: dict = {"count": len(texts), "unique": len(set(" ".join(words(t)) for t in texts))}
    for n in ns:
        out[f"distinct-{n}"] = distinct_n(texts, n) if texts else float("nan")
    out[f"self-sim-{sim_n}"] = self_similarity(texts, sim_n) if len(texts) > 1 else float("nan")
    if score is not None:
        out["pass_rate"] = pass_rate(records, score) if records else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# Re-weighting

def normalise_weights(weights: Sequence[float]) -> list[float]:
    """w / Σw; weights must be finite, ≥ 0 and not all zero."""
    w = [float(x) for x in weights]
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError("weights must be a non-empty list of finite non-negative numbers with a positive sum")
    total = sum(w)
    return [x / total for x in w]


def inverse_frequency_weights(records: Sequence[dict], keys: Sequence[str]) -> list[float]:
    """w_i = 1 / (C · count(c_i)) with c_i = the record's values of the attributes `keys` (sums to 1)."""
    if not records or not keys:
        raise ValueError("inverse_frequency_weights needs records and at least one attribute key")
    missing = {k for r in records for k in keys if k not in r.get("attributes", {})}
    if missing:
        raise ValueError(f"records lack the attributes {sorted(missing)}")
    cells = [tuple(repr(r["attributes"][k]) for k in keys) for r in records]
    counts = Counter(cells)
    return normalise_weights([1.0 / (len(counts) * counts[c]) for c in cells])


def score_weights(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """softmax(s / T): higher-scored records weigh more; T → ∞ is uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = [float(x) / temperature for x in scores]
    if not s or any(not math.isfinite(x) for x in s):
        raise ValueError("scores must be a non-empty list of finite numbers")
    m = max(s)
    return normalise_weights([math.exp(x - m) for x in s])


def with_weights(records: Sequence[dict], weights: Sequence[float]) -> list[dict]:
    """Copies of the records with a `weight` field (normalised to sum to 1), kept with their provenance."""
    if len(records) != len(weights):
        raise ValueError(f"{len(records)} records but {len(weights)} weights")
    return [{**r, "weight": w} for r, w in zip(records, normalise_weights(weights))]


def weighted_batches(items: Sequence, weights: Sequence[float], batch_size: int, seed: int,
                     collate_fn: Callable) -> Callable[[int], object]:
    """batch_fn(step) for `train_loop`: `batch_size` items drawn with replacement with probability w_i,
    deterministic in (seed, step) (the weighted counterpart of `loop.sample_batches`)."""
    if len(items) != len(weights):
        raise ValueError(f"{len(items)} items but {len(weights)} weights")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    w = normalise_weights(weights)

    def batch_fn(step: int):
        rng = random.Random(f"{seed}/weighted/{step}")
        return collate_fn([items[i] for i in rng.choices(range(len(items)), weights=w, k=batch_size)])
    return batch_fn
