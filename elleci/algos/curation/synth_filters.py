"""Curation of synthetic data (stage 5 of `elleci.algos.curation.synth`): word n-grams, exact and near-duplicate
removal (MinHash + LSH over word n-gram shingles, plain Python/NumPy), and filters as composable steps.

Long et al., "On LLMs-Driven Synthetic Data Generation, Curation, and Evaluation", Findings of ACL 2024
(https://arxiv.org/abs/2406.15126), §Curation / sample filtering.

    kept, rejected, stats = apply_filters(records, [verifier_filter(check), exact_dedup_filter(),
                                                    near_dedup_filter(threshold=0.8)])

Objective (near-duplicates): drop record j when J(S_i, S_j) = |S_i ∩ S_j| / |S_i ∪ S_j| ≥ τ for an earlier
kept record i, found through MinHash: P[min_h(S_i) = min_h(S_j)] = J(S_i, S_j).

Glossary:
    S_i        the set of word n-grams (shingles) of record i's text (lower-cased, whitespace-split)
    J          Jaccard similarity of two shingle sets
    h_m        the m-th of M random hash functions x ↦ (a_m·x + b_m) mod p, p = 2³¹ − 1
    sig_i      the MinHash signature [M]: sig_i[m] = min over s in S_i of h_m(hash(s))
    b, r       LSH bands and rows per band (b·r = M): records sharing one band are candidates
    τ          the near-duplicate threshold on J

A filter is a `Filter(name, fn)` with fn(records) → (keep mask, scores or None); `apply_filters` runs them
in order, each on the survivors of the previous ones, records the names passed in `filters_passed` and
each filter's scores in `scores[name]`. Appending a filter never adds samples (its keep set is a subset).

Differences from the survey:
1. Near-duplicates are confirmed by the exact Jaccard of the shingle sets after LSH proposes a
   candidate, so there are no false positives; LSH false negatives remain (bands chosen so that a pair
   at J = τ is a candidate with probability ≥ 0.99, see `lsh_bands`). No embedding-based dedup.
2. Dedup keeps the first record of each group (greedy in input order), so it is order-dependent:
   a filter placed before it can change which duplicate survives (not how the rule-based filters act).
3. Texts shorter than n words are one shingle (their whole normalised text), so they stay comparable.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PRIME = (1 << 31) - 1                      # p: a Mersenne prime; (a·x + b) < 2⁶² fits in int64

__all__ = ["words", "ngrams", "shingles", "jaccard", "minhash_signatures", "minhash_jaccard", "lsh_bands",
           "near_duplicates", "exact_duplicates", "record_text", "Filter", "apply_filters", "rule_filter",
           "length_filter", "regex_filter", "verifier_filter", "judge_filter", "exact_dedup_filter",
           "near_dedup_filter", "decontamination_filter", "self_consistency_filter"]


# ----------------------------------------------------------------------------------------------
# Words, n-grams, similarity

def words(text: str) -> list[str]:
    """Lower-cased whitespace-separated words."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    return text.lower().split()


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of `text`, in order, with repeats (none when it has fewer than n words)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = words(text)
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def shingles(text: str, n: int = 3) -> set[str]:
    """The set of word n-grams joined by spaces; a text of fewer than n words is one shingle (all of it)."""
    grams = ngrams(text, n)
    if grams:
        return {" ".join(g) for g in grams}
    w = words(text)
    return {" ".join(w)} if w else set()


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _hash32(s: str) -> int:
    """A stable hash of a shingle in [0, p) (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % PRIME


def minhash_signatures(texts: Sequence[str], *, n: int = 3, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signatures → int64 [N, M]. An empty text has the all-p signature (equal only to other empties)."""
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, size=num_perm, dtype=np.int64)         # [M]
    b = rng.integers(0, PRIME, size=num_perm, dtype=np.int64)         # [M]
    sigs = np.full((len(texts), num_perm), PRIME, dtype=np.int64)     # [N, M]
    for i, t in enumerate(texts):
        x = np.array(sorted(_hash32(s) for s in shingles(t, n)), dtype=np.int64)   # [S]
        if x.size:
            sigs[i] = ((x[:, None] * a[None, :] + b[None, :]) % PRIME).min(0)      # min_s h_m(s)
    return sigs


def minhash_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of J: the fraction of equal signature entries."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures differ in shape: {sig_a.shape} vs {sig_b.shape}")
    return float((sig_a == sig_b).mean())


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(b, r) with b·r = M: the largest r (fewest candidates) for which a pair at J = τ shares a band with
    probability 1 − (1 − τʳ)ᵇ ≥ `recall`."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        if num_perm % r == 0 and 1.0 - (1.0 - threshold ** r) ** (num_perm // r) >= recall:
            best = (num_perm // r, r)
    return best


def _lsh_candidates(sigs: np.ndarray, bands: int) -> dict[int, set[int]]:
    """j → the earlier records i < j that share at least one band bucket with j."""
    rows = sigs.shape[1] // bands
    out: dict[int, set[int]] = defaultdict(set)
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for j, sig in enumerate(sigs[:, band * rows:(band + 1) * rows]):
            key = sig.tobytes()
            out[j].update(buckets[key])
            buckets[key].append(j)
    return out


def near_duplicates(texts: Sequence[str], *, threshold: float = 0.8, n: int = 3, num_perm: int = 128,
                    seed: int = 0, exact: bool = False) -> list[int | None]:
    """For each text, the index of an earlier *kept* text with J ≥ τ (it is then a duplicate), else None.

    exact=True compares every pair (O(N²), the definition); otherwise MinHash + LSH propose candidates and
    the exact Jaccard confirms them (Difference 1).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    sets = [shingles(t, n) for t in texts]
    if exact:
        candidates = {j: set(range(j)) for j in range(len(texts))}
    else:
        bands, _ = lsh_bands(threshold, num_perm)
        candidates = _lsh_candidates(minhash_signatures(texts, n=n, num_perm=num_perm, seed=seed), bands)
    out: list[int | None] = []
    kept: set[int] = set()
    for j in range(len(texts)):
        dup = next((i for i in sorted(candidates.get(j, ())) if i in kept and jaccard(sets[i], sets[j]) >= threshold),
                   None)
        out.append(dup)
        if dup is None:
            kept.add(j)
    return out


def _normalise(text: str) -> str:
    return " ".join(words(text))


def exact_duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of the first earlier text equal after normalisation (case, spaces), else None."""
    first: dict[str, int] = {}
    out = []
    for j, t in enumerate(texts):
        key = hashlib.sha256(_normalise(t).encode("utf-8")).hexdigest()
        out.append(first.get(key))
        first.setdefault(key, j)
    return out


def record_text(record: dict) -> str:
    """The text a record is judged by: its input (if any) and its output."""
    return f"{record['input']}\n{record['output']}" if record.get("input") else record["output"]


# ----------------------------------------------------------------------------------------------
# Filters

@dataclass(frozen=True)
class Filter:
    """A named curation step: fn(records) → (keep mask [N], scores [N] or None)."""
    name: str
    fn: Callable[[list[dict]], tuple[Sequence[bool], Sequence[float] | None]]


def apply_filters(records: Sequence[dict], filters: Sequence[Filter]) -> tuple[list[dict], list[dict], list[dict]]:
    """Run `filters` in order, each on the survivors of the previous ones.

    Returns (kept, rejected, stats): copies of the records with `filters_passed` extended and
    `scores[name]` set by filters that score; a rejected record carries `rejected_by`; stats has one
    {"filter", "in", "kept"} per filter.
    """
    names = [f.name for f in filters]
    if len(set(names)) != len(names):
        raise ValueError(f"filter names must be unique, got {names}")
    current = [{**r, "filters_passed": list(r.get("filters_passed", [])), "scores": dict(r.get("scores", {}))}
               for r in records]
    rejected, stats = [], []
    for f in filters:
        keep, scores = f.fn(current)
        keep = list(keep)
        if len(keep) != len(current) or (scores is not None and len(scores) != len(current)):
            raise ValueError(f"filter {f.name!r} returned {len(keep)} decisions for {len(current)} records")
        survivors = []
        for i, r in enumerate(current):
            if scores is not None:
                r["scores"][f.name] = float(scores[i])
            if keep[i]:
                r["filters_passed"].append(f.name)
                survivors.append(r)
            else:
                rejected.append({**r, "rejected_by": f.name})
        stats.append({"filter": f.name, "in": len(current), "kept": len(survivors)})
        current = survivors
    return current, rejected, stats


def rule_filter(name: str, predicate: Callable[[dict], bool]) -> Filter:
    """Keep the records for which predicate(record) is true (a heuristic rule)."""
    return Filter(name, lambda recs: ([bool(predicate(r)) for r in recs], None))


def length_filter(min_words: int = 1, max_words: int | None = None, field: str = "output") -> Filter:
    """Keep outputs with min_words ≤ #words ≤ max_words."""
    if min_words < 0 or (max_words is not None and max_words < min_words):
        raise ValueError(f"need 0 <= min_words <= max_words, got {min_words}, {max_words}")
    hi = math.inf if max_words is None else max_words
    return rule_filter("length", lambda r: min_words <= len(words(r[field])) <= hi)


def regex_filter(pattern: str, field: str = "output", name: str = "format") -> Filter:
    """Keep records whose `field` matches `pattern` anywhere (re.search): a format-validity check."""
    compiled = re.compile(pattern)
    return rule_filter(name, lambda r: compiled.search(r[field]) is not None)


def verifier_filter(verify: Callable[[dict], bool | float], *, threshold: float = 0.5,
                    name: str = "verifier") -> Filter:
    """Score every record with verify(record) (bool → 0/1) and keep score ≥ threshold."""
    def fn(recs):
        scores = [float(verify(r)) for r in recs]
        return [s >= threshold for s in scores], scores
    return Filter(name, fn)


def _pairwise_scores(labeler, recs: list[dict]) -> list[float]:
    """Round robin within each prompt group: a record's score is its mean P(a ≻ b) against the other
    samples of its prompt (0.5 when it is alone)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        groups[r.get("prompt_id", r["id"])].append(i)
    pairs = [(i, j) for g in groups.values() for a, i in enumerate(g) for j in g[a + 1:]]
    wins, counts = [0.0] * len(recs), [0] * len(recs)
    if pairs:
        p = labeler.label([recs[i]["prompt"] for i, _ in pairs], [recs[i]["output"] for i, _ in pairs],
                          [recs[j]["output"] for _, j in pairs]).tolist()
        for (i, j), pij in zip(pairs, p):
            wins[i], wins[j] = wins[i] + pij, wins[j] + 1.0 - pij
            counts[i], counts[j] = counts[i] + 1, counts[j] + 1
    return [w / c if c else 0.5 for w, c in zip(wins, counts)]


def judge_filter(judge, *, threshold: float | None = None, top_fraction: float | None = None,
                 name: str = "judge") -> Filter:
    """LLM-as-judge: score with a `Scorer` (`DirectScorer`, `RewardModel`: judge.score(prompts, outputs)) or a
    `PairwiseLabeler` (mean win probability within each prompt group), then keep score ≥ threshold or the
    top fraction (ties at the cut kept)."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of threshold and top_fraction")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if not (hasattr(judge, "score") or hasattr(judge, "label")):
        raise ValueError(f"judge must have .score(prompts, responses) or .label(...); got {type(judge).__name__}")

    def fn(recs):
        if not recs:
            return [], []
        if hasattr(judge, "score"):
            scores = [float(s) for s in judge.score([r["prompt"] for r in recs], [r["output"] for r in recs])]
        else:
            scores = _pairwise_scores(judge, recs)
        cut = threshold if threshold is not None else sorted(scores, reverse=True)[
            max(1, math.ceil(top_fraction * len(scores))) - 1]
        return [s >= cut for s in scores], scores
    return Filter(name, fn)


def exact_dedup_filter(key: Callable[[dict], str] = record_text, name: str = "exact_dedup") -> Filter:
    """Drop records whose text equals (after normalisation) an earlier record's."""
    return Filter(name, lambda recs: ([d is None for d in exact_duplicates([key(r) for r in recs])], None))


def near_dedup_filter(threshold: float = 0.8, *, n: int = 3, num_perm: int = 128, seed: int = 0,
                      key: Callable[[dict], str] = record_text, name: str = "near_dedup") -> Filter:
    """Drop records with word-n-gram Jaccard ≥ threshold to an earlier kept record (MinHash + LSH)."""
    def fn(recs):
        dups = near_duplicates([key(r) for r in recs], threshold=threshold, n=n, num_perm=num_perm, seed=seed)
        return [d is None for d in dups], None
    return Filter(name, fn)


def decontamination_filter(reference_texts: Sequence[str], *, n: int = 13, field: str = "input",
                           name: str = "decontaminate") -> Filter:
    """Drop records whose `field` shares a word n-gram with any reference (eval-set) text; a text shorter
    than n words counts as one n-gram (so an exact copy of a short eval question is caught)."""
    banned = set().union(*(shingles(t, n) for t in reference_texts)) if reference_texts else set()
    return rule_filter(name, lambda r: not (shingles(r.get(field) or "", n) & banned))


def self_consistency_filter(answer_fn: Callable[[str], object], *, min_agreement: float = 0.5,
                            name: str = "self_consistency") -> Filter:
    """Label enhancement by vote: within each prompt group keep the samples whose answer (answer_fn(output),
    None = no answer) is the group's majority answer, when its share of the group is ≥ min_agreement.
    The score is the share of the group that agrees with the record's answer."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")

    def fn(recs):
        answers = [answer_fn(r["output"]) for r in recs]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(recs):
            groups[r.get("prompt_id", r["id"])].append(i)
        keep, scores = [False] * len(recs), [0.0] * len(recs)
        for g in groups.values():
            votes = Counter(answers[i] for i in g if answers[i] is not None)
            top = votes.most_common(1)[0] if votes else (None, 0)
            for i in g:
                scores[i] = votes[answers[i]] / len(g) if answers[i] is not None else 0.0
                keep[i] = answers[i] is not None and answers[i] == top[0] and top[1] / len(g) >= min_agreement
        return keep, scores
    return Filter(name, fn)
