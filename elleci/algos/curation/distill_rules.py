"""Rule-based agents for corpus distillation (`elleci.algos.curation.distill`): baselines, stubs and the cold-start
evaluator. Each has the signature of its protocol in `elleci.algos.curation.distill` and a `name` for provenance.

    cloze_questions(chunks, seed=0)          QuestionGenerator: a sentence with its last word asked for
    term_preference((q1, c1), (q2, c2))      Preference: the pair whose question's terms match its context more
    overlap_answerer(questions, contexts)    Answerer: the context sentence sharing most terms with the question
    OverlapJudge(min_overlap=0.6)(triples)   Judge: answer is a context sentence and covers the question's terms
    keep_all(triples)                        Judge: keeps everything ("no judge")

terms(x) are x's words minus `STOP_WORDS`, S-stemmed: the stand-in for m-KAILIN's MeSH terms
(arXiv 2504.19565), whose cold-start preference is an ontology similarity between question and context;
here it is the Jaccard similarity of the two term sets (the exact MeSH tree-distance form is unpublished).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from elleci.algos.curation.retrieval import s_stem, tokenize
from elleci.algos.curation.distill_types import Chunk, Triple, Verdict

STOP_WORDS = frozenset(
    "a an and are as at be by did do does for from had has have he her his how in is it its of on or she "
    "that the their them they this to was were what when where which who whom whose why will with".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """Sentences of `text` (split after ".", "!" or "?" followed by whitespace), stripped, non-empty."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def normalise_question(text: str) -> str:
    """Dedup key: lower-case words joined by single spaces (punctuation and spacing ignored)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def terms(text: str) -> frozenset[str]:
    """The ontology terms of a text: its words minus `STOP_WORDS`, S-stemmed."""
    return frozenset(s_stem(w) for w in tokenize(text, stem=False) if w not in STOP_WORDS)


def term_similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard |a ∩ b| / |a ∪ b| in [0, 1]; identical sets (the empty set included) score 1, the maximum."""
    if a == b:
        return 1.0
    return len(a & b) / len(a | b)


def term_preference(a: tuple[str, str], b: tuple[str, str]) -> int:
    """Pairwise evaluator (the cold-start rule): prefer the (question, context) whose question's terms are
    more similar to its context's; +1 = a, −1 = b, 0 = tie. Antisymmetric by construction."""
    sa, sb = (term_similarity(terms(q), terms(c)) for q, c in (a, b))
    return (sa > sb) - (sa < sb)


term_preference.name = "term-overlap"


def cloze_questions(chunks: Sequence[Chunk], *, seed: int = 0) -> list[list[str]]:
    """Question generator: per sentence of a chunk, the sentence with its last word replaced by "what"
    ("Anna lives in Milan." → "Anna lives in what?"); sentences under three words are skipped."""
    out = []
    for c in chunks:
        qs = []
        for s in sentences(c.text):
            words = s.rstrip(".!?").split()
            if len(words) >= 3:
                qs.append(" ".join(words[:-1]) + " what?")
        out.append(qs)
    return out


cloze_questions.name = "cloze"


def overlap_answerer(questions: Sequence[str], contexts: Sequence[str]) -> list[str]:
    """Extractive answerer: the context sentence sharing the most terms with the question (the earliest on
    ties); "" when no sentence shares a term."""
    out = []
    for q, ctx in zip(questions, contexts):
        qt = terms(q)
        best, best_n = "", 0
        for s in sentences(ctx):
            n = len(qt & terms(s))
            if n > best_n:
                best, best_n = s, n
        out.append(best)
    return out


overlap_answerer.name = "overlap-extract"


@dataclass
class OverlapJudge:
    """Keep a triple iff its answer is a sentence of the retrieved context (grounded) and shares at least
    `min_overlap` of the question's terms (relevant); otherwise reject, saying which test failed."""
    min_overlap: float = 0.6
    name: str = "overlap-judge"

    def __post_init__(self):
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {self.min_overlap}")

    def __call__(self, triples: Sequence[Triple]) -> list[Verdict]:
        out = []
        for t in triples:
            answer = " ".join(t.answer.split())
            if answer not in sentences(" ".join(t.context.split())):
                out.append((False, "answer is not a sentence of the retrieved context"))
                continue
            qt = terms(t.question)
            share = len(qt & terms(answer)) / len(qt) if qt else 0.0
            if share < self.min_overlap:
                out.append((False, f"answer shares {share:.2f} of the question's terms (< {self.min_overlap:g})"))
            else:
                out.append((True, f"grounded; shares {share:.2f} of the question's terms"))
        return out


def keep_all(triples: Sequence[Triple]) -> list[Verdict]:
    """The no-judge baseline: keep every triple."""
    return [(True, "no judge") for _ in triples]


keep_all.name = "no-judge"
