"""Tests for elleci.tasks.documents: the corpus states only its world's facts, the folder round-trips, and
the checker on hand cases."""
import math

import pytest

from elleci.algos.curation.distill import DUPLICATE, EMPTY, Chunk, load_chunks
from elleci.tasks.documents import (check_triple, covered_facts, make_corpus, parse_question, read_facts,
                                    template_questions, write_corpus)
from elleci.testbed.distill_eval import score_records
from elleci.tasks.grounded_qa import NAMES, RELATIONS, parse_claim, split_sentences

FACTS = {("Anna", "lives_in", "Milan"), ("Anna", "has_pet", "dog"), ("Marco", "works_as", "baker")}


def test_corpus_is_deterministic_consistent_and_round_trips_through_a_folder(tmp_path):
    a, b = make_corpus(3, n_docs=6), make_corpus(3, n_docs=6)
    assert a == b and a != make_corpus(4, n_docs=6)
    for s, rel, v in a.facts:                                   # a consistent world: one value per relation
        assert a.profiles[s][rel] == v
    stated = [parse_claim(s) for _, text in a.documents for line in text.splitlines()
              if not line.startswith("#") for s in split_sentences(line)]
    assert None not in stated and set(stated) == a.facts        # every sentence is a fact, every fact stated
    paths = write_corpus(a, tmp_path / "docs")
    assert [p.name for p in paths] == [d for d, _ in a.documents] and {p.suffix for p in paths} == {".txt", ".md"}
    assert read_facts(tmp_path / "docs") == a.facts
    chunks = load_chunks(tmp_path / "docs")                     # one passage per paragraph, headings dropped
    assert len(chunks) == sum(t.count("\n\n") + 1 - t.startswith("#") for _, t in a.documents)
    assert all(len({parse_claim(s)[0] for s in split_sentences(c.text)}) == 1 for c in chunks)   # one person


def test_bad_corpus_settings_raise():
    with pytest.raises(ValueError, match="paragraphs"):
        make_corpus(0, paragraphs=(3, 2))
    with pytest.raises(ValueError, match="people"):
        make_corpus(0, people=len(NAMES) + 1)


def test_parse_question_inverts_every_template():
    for rel, r in RELATIONS.items():
        for name in NAMES:
            assert parse_question(r.question.format(s=name)) == (name, rel)
    assert parse_question("Is it true that Anna lives in Milan?") is None


@pytest.mark.parametrize("question, answer, true, answers, correct", [
    ("Where does Anna live?", "Anna lives in Milan.", True, True, True),
    ("Where does Anna live?", "Anna lives in Rome.", False, True, False),          # wrong value
    ("Where does Anna live?", "Anna has a dog.", True, False, False),              # true, another question
    ("What is the job of Anna?", "Marco works as a baker.", True, False, False),   # another person's fact
    ("Where does Anna live?", "Anna lives in Milan. Anna has a cat.", False, True, False),  # one made-up claim
    ("Where does Anna live?", "Milan", False, False, False),                       # not a claim
    ("Where does Anna live?", "", False, False, False),
    ("Anna lives in what?", "Anna lives in Milan.", True, False, False),           # unparsed question
])
def test_check_triple_hand_cases(question, answer, true, answers, correct):
    c = check_triple(FACTS, question, answer)
    assert (c["true"], c["answers_question"], c["correct"]) == (true, answers, correct)
    assert c["fact"] == (("Anna", "lives_in", "Milan") if correct else None)


def test_coverage_and_scores_by_hand():
    assert covered_facts(FACTS, [("Where does Anna live?", "Anna lives in Milan."),
                                 ("What pet does Anna have?", "Anna has a cat.")]) == {("Anna", "lives_in", "Milan")}
    rec = lambda q, a, keep, reason="r", src=True: {"question": q, "answer": a, "keep": keep, "reason": reason,
                                                    "source_retrieved": src}
    records = [rec("Where does Anna live?", "Anna lives in Milan.", True),
               rec("What pet does Anna have?", "Anna has a cat.", True, src=False),
               rec("What is the job of Marco?", "Marco works as a baker.", False),
               rec("Where does Anna live?", "Anna lives in Milan.", False, DUPLICATE),
               rec("What does Marco like?", "", False, EMPTY)]
    s = score_records(FACTS, records)
    assert s["triples"] == 2 and s["precision"] == 0.5 and s["answer_true"] == 0.5
    assert s["covered"] == 1 and s["coverage"] == pytest.approx(1 / 3) and s["source_retrieved"] == 0.8
    assert s["judge_accuracy"] == 0.5          # right: keep+correct, dup (kept)+correct; wrong: cat kept, baker dropped
    assert score_records(FACTS, records, kept_only=False)["coverage"] == pytest.approx(2 / 3)
    assert math.isnan(score_records(FACTS, [])["precision"])


def test_template_questions_ask_each_stated_fact():
    chunk = Chunk("d#0", "d", "Anna lives in Milan. Hello there. Anna has a dog.")
    assert template_questions([chunk]) == [["Where does Anna live?", "What pet does Anna have?"]]
