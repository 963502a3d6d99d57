"""Scoring corpus distillation (`elleci.algos.curation.distill`) on the generated documents task
(`elleci.tasks.documents`): precision of the kept triples, coverage of the corpus facts, the judge's accuracy.

    score = score_records(documents.read_facts("docs/"), read_records("out/records.jsonl"))
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from elleci.algos.curation.distill import DUPLICATE, EMPTY
from elleci.tasks.documents import check_triple
from elleci.tasks.grounded_qa import Fact


def score_records(facts: Iterable[Fact], records: Sequence[Mapping], *, kept_only: bool = True) -> dict:
    """Precision and coverage of distilled records ({"question", "answer", "keep", "source_retrieved"}).

    Returns {"triples" (kept, or all when not kept_only), "precision" (correct / triples),
    "answer_true" (true / triples), "coverage" (covered facts / all facts), "covered", "facts",
    "source_retrieved" (the question's own chunk was among the retrieved ones), "judge_accuracy" (the
    judge's keep agrees with correctness; duplicates count as kept by the judge, empty answers are left
    out)}, the last two over all records; NaN where a denominator is 0."""
    facts = frozenset(facts)
    rows = [r for r in records if r["keep"] or not kept_only]
    checks = [check_triple(facts, r["question"], r["answer"]) for r in rows]
    covered = {c["fact"] for c in checks if c["correct"]}
    ratio = lambda a, b: a / b if b else math.nan
    judged = [(r["keep"] or r["reason"] == DUPLICATE, check_triple(facts, r["question"], r["answer"])["correct"])
              for r in records if r["reason"] != EMPTY]
    return {"triples": len(rows), "precision": ratio(sum(c["correct"] for c in checks), len(rows)),
            "answer_true": ratio(sum(c["true"] for c in checks), len(rows)),
            "coverage": ratio(len(covered), len(facts)), "covered": len(covered), "facts": len(facts),
            "source_retrieved": ratio(sum(bool(r.get("source_retrieved")) for r in records), len(records)),
            "judge_accuracy": ratio(sum(k == c for k, c in judged), len(judged))}
