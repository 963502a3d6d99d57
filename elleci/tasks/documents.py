"""A generated corpus of documents with known facts: the test bed of corpus distillation
(`elleci.algos.curation.distill`).

Each of `people` invented persons (the names of `elleci.tasks.grounded_qa`) has one value per relation
(a consistent world); a document is a few paragraphs, each about one person and stating some of that
person's facts in the grounded-QA sentence templates, so a person's facts are spread over several
documents and a fact may be repeated. The corpus's facts are those stated somewhere.

    corpus = make_corpus(seed=0)                      # documents + the facts they state
    write_corpus(corpus, "docs/")                      # doc00.txt, doc01.md (with a heading), ...
    facts = read_facts("docs/")                        # == corpus.facts: the checker needs only the folder
    check_triple(facts, "Where does Anna live?", "Anna lives in Milan.")   # {"true", "answers_question", ...}
    # scoring distilled records against the facts: elleci.testbed.distill_eval.score_records

A triple is *correct* when its answer is true (it has at least one claim and every claim, read back by
`grounded_qa.parse_claim`, is a fact of the corpus) and answers the question (some claim is about the
question's subject and relation, read by `parse_question`). A fact is *covered* when a kept, correct
triple states it as the answer to its question. Deterministic given the seed; no global RNG is used.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_path
from ..data import read_documents
from .grounded_qa import NAMES, RELATIONS, Fact, parse_claim, render_fact, split_sentences

_QUESTION_RES = {rel: re.compile("^" + re.escape(r.question).replace(re.escape("{s}"), r"([A-Za-z]+)") + "$")
                 for rel, r in RELATIONS.items()}


@dataclass(frozen=True)
class Corpus:
    """Documents (doc_id, text), the facts they state, and every person's full profile."""
    documents: tuple[tuple[str, str], ...]
    facts: frozenset[Fact]
    profiles: Mapping[str, Mapping[str, str]]


def make_corpus(seed: int = 0, n_docs: int = 10, *, paragraphs: tuple[int, int] = (2, 4),
                facts_per_paragraph: tuple[int, int] = (2, 3), people: int = len(NAMES)) -> Corpus:
    """`n_docs` documents of `paragraphs` (inclusive range) paragraphs about distinct people, each paragraph
    stating `facts_per_paragraph` (inclusive range) distinct facts of its person in random order. Odd
    documents are markdown with a "# Notes <i>" heading."""
    p_lo, p_hi = paragraphs
    f_lo, f_hi = facts_per_paragraph
    if n_docs < 1 or not 1 <= people <= len(NAMES):
        raise ValueError(f"need n_docs >= 1 and 1 <= people <= {len(NAMES)}, got {n_docs}, {people}")
    if not (1 <= p_lo <= p_hi <= people and 1 <= f_lo <= f_hi <= len(RELATIONS)):
        raise ValueError(f"need 1 <= paragraphs <= people and 1 <= facts_per_paragraph <= {len(RELATIONS)}, "
                         f"got {paragraphs}, {facts_per_paragraph}")
    rng = random.Random(f"documents/{seed}/{n_docs}/{p_lo}-{p_hi}/{f_lo}-{f_hi}/{people}")
    names = rng.sample(NAMES, people)
    profiles = {n: {rel: rng.choice(r.values) for rel, r in RELATIONS.items()} for n in names}
    documents, facts = [], set()
    for d in range(n_docs):
        paras = []
        for name in rng.sample(names, rng.randint(p_lo, p_hi)):
            rels = rng.sample(sorted(RELATIONS), rng.randint(f_lo, f_hi))
            stated = [(name, rel, profiles[name][rel]) for rel in rels]
            facts.update(stated)
            paras.append(" ".join(map(render_fact, stated)))
        body = "\n\n".join(paras) + "\n"
        documents.append((f"doc{d:02d}.md", f"# Notes {d}\n\n{body}") if d % 2 else (f"doc{d:02d}.txt", body))
    return Corpus(tuple(documents), frozenset(facts), profiles)


def write_corpus(corpus: Corpus, folder) -> list[Path]:
    """Write every document under `folder` (each file atomically); returns the paths."""
    paths = []
    for doc_id, text in corpus.documents:
        path = Path(folder) / doc_id
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def read_facts(folder) -> frozenset[Fact]:
    """The facts stated in a folder's .txt/.md documents: every sentence that parses as a claim."""
    return frozenset(f for _, text in read_documents(folder) for line in text.splitlines()
                     if not line.lstrip().startswith("#") for f in map(parse_claim, split_sentences(line)) if f)


# ------------------------------------------------------------------------------------- checking

def parse_question(question: str) -> tuple[str, str] | None:
    """A grounded-QA question → (subject, relation) it asks for, or None if no template fits."""
    text = " ".join(question.split())
    for rel, pattern in _QUESTION_RES.items():
        m = pattern.match(text)
        if m:
            return m.group(1), rel
    return None


def check_triple(facts: Iterable[Fact], question: str, answer: str) -> dict:
    """{"asked", "claims", "true", "answers_question", "correct", "fact"} for one (question, answer).

    true: the answer has >= 1 claim and every claim parses and is in `facts`; answers_question: a claim
    is about the asked (subject, relation); correct: both; fact: the claim answering the question when
    correct (the fact it covers), else None."""
    facts = facts if isinstance(facts, (set, frozenset)) else set(facts)
    asked = parse_question(question)
    claims = [parse_claim(s) for s in split_sentences(answer)]
    true = bool(claims) and all(c is not None and c in facts for c in claims)
    answering = [c for c in claims if c is not None and asked is not None and (c[0], c[1]) == asked]
    correct = true and bool(answering)
    return {"asked": asked, "claims": claims, "true": true, "answers_question": bool(answering),
            "correct": correct, "fact": answering[0] if correct else None}


def covered_facts(facts: Iterable[Fact], triples: Iterable[tuple[str, str]]) -> set[Fact]:
    """The facts stated as the correct answer of some (question, answer) pair."""
    facts = frozenset(facts)
    return {c["fact"] for q, a in triples if (c := check_triple(facts, q, a))["correct"]}


# ----------------------------------------------------------------------------- a task-aware agent

def template_questions(chunks: Sequence, *, seed: int = 0) -> list[list[str]]:
    """QuestionGenerator that knows the task: per claim sentence of a chunk, its relation's question
    ("Anna lives in Milan." → "Where does Anna live?"); sentences that are not claims give none."""
    return [[RELATIONS[f[1]].question.format(s=f[0]) for f in map(parse_claim, split_sentences(c.text)) if f]
            for c in chunks]


template_questions.name = "fact-templates"
