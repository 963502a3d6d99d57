"""Tests for elleci.tasks.grounded_qa: items, claim parsing, answer checking, training data, evaluation."""
import random
from collections import Counter

import pytest
import torch

from elleci.algos.judging import claim_to_question, labeler_prompt
from elleci.testbed.completion import completer
from elleci.model import Tokenizer
from elleci.tasks.grounded_qa import (NAMES, RELATIONS, Item, check_answer, hallucination_rate, is_test_passage,
                                      make_items, parse_claim, pretraining_texts, render_fact, sft_examples,
                                      split_sentences, verification_examples)

ITEM = Item(passage="Anna lives in Milan. Anna has a dog. Marco likes tea.", question="Where does Anna live?",
            facts=(("Anna", "lives_in", "Milan"), ("Anna", "has_pet", "dog"), ("Marco", "likes", "tea")),
            asked=("Anna", "lives_in", "Milan"), answer="Anna lives in Milan.")


@pytest.fixture(scope="module")
def train():
    return make_items(400, seed=0)


# ----------------------------------------------------------------------------- items

def test_deterministic_given_seed():
    assert make_items(30, seed=5) == make_items(30, seed=5)
    assert make_items(30, seed=5) != make_items(30, seed=6)
    assert make_items(10, seed=5) == make_items(30, seed=5)[:10]
    items = make_items(20, seed=1)
    assert sft_examples(items, seed=2) == sft_examples(items, seed=2)
    assert verification_examples(items, seed=2) == verification_examples(items, seed=2)
    state = random.getstate()
    make_items(10, seed=0), sft_examples(items), verification_examples(items), pretraining_texts(items)
    assert random.getstate() == state                       # the global RNG is untouched


def test_train_and_test_are_disjoint():
    train = make_items(1500, seed=0, split="train")
    test = make_items(300, seed=0, split="test")
    assert not {it.passage for it in train} & {it.passage for it in test}
    assert all(is_test_passage(it.passage) for it in test) and not any(is_test_passage(it.passage) for it in train)
    with pytest.raises(ValueError):
        make_items(3, split="dev")


def test_items_are_consistent(train):
    for it in train:
        assert it.passage == " ".join(render_fact(f) for f in it.facts)
        assert it.asked in it.facts and it.answer == render_fact(it.asked)
        assert it.question == RELATIONS[it.asked[1]].question.format(s=it.asked[0])
        assert it.prompt == f"Passage: {it.passage}\nQuestion: {it.question}"
        people = Counter(s for s, _, _ in it.facts)
        assert len(people) == 2 and all(2 <= c <= 3 for c in people.values()) and set(people) <= set(NAMES)
        assert len({(s, r) for s, r, _ in it.facts}) == len(it.facts)          # one value per relation
        assert all(v in RELATIONS[r].values for _, r, v in it.facts)
    assert {it.asked[1] for it in train} == set(RELATIONS)


# ----------------------------------------------------------------------------- claims

def test_parse_claim():
    assert parse_claim("Anna lives in Milan.") == ("Anna", "lives_in", "Milan")
    assert parse_claim("  Marco works as a baker ") == ("Marco", "works_as", "baker")
    assert parse_claim("Sara has a goat.") == ("Sara", "has_pet", "goat")
    assert parse_claim("Sara likes soup.") == ("Sara", "likes", "soup")
    for bad in ["Anna lives Milan.", "Anna is happy.", "", "lives in Milan.", "Anna likes tea and coffee."]:
        assert parse_claim(bad) is None
    for rel, r in RELATIONS.items():
        for v in r.values:
            assert parse_claim(render_fact(("Luca", rel, v))) == ("Luca", rel, v)


def test_split_sentences():
    assert split_sentences("Anna lives in Milan. Anna has a dog.") == ["Anna lives in Milan.", "Anna has a dog."]
    assert split_sentences("A b.\nC d?  E!") == ["A b.", "C d?", "E!"]
    assert split_sentences("  ") == [] and split_sentences("no period") == ["no period"]


@pytest.mark.parametrize("text, expected", [
    ("Anna lives in Milan.", (1, 0, True)),
    ("Anna lives in Milan. Anna has a dog.", (2, 0, True)),
    ("Anna lives in Milan. Anna has a cat.", (2, 1, True)),          # a value the passage does not state
    ("Anna lives in Rome.", (1, 1, False)),                            # wrong answer
    ("Anna lives in Milan. Anna is very happy.", (2, 1, True)),        # unparseable sentence
    ("Anna likes tea. Anna works as a pilot.", (2, 2, False)),         # Marco's fact; unmentioned relation
    ("", (0, 0, False)),
])
def test_check_answer_counts(text, expected):
    got = check_answer(ITEM, text)
    assert (got["n_claims"], got["n_unsupported"], got["answered_correctly"]) == expected


# ----------------------------------------------------------------------------- training data

def _answer(conv):
    assert [m["role"] for m in conv] == ["user", "assistant"]
    return conv[1]["content"]


def test_sft_examples_hallucinate_at_the_requested_rate(train):
    for conv, it in zip(sft_examples(train, seed=0, p_hallucinate=0.0), train):
        assert conv[0]["content"] == it.prompt
        c = check_answer(it, _answer(conv))
        assert c["answered_correctly"] and c["n_unsupported"] == 0 and c["n_claims"] == 2
    for conv, it in zip(sft_examples(train, seed=0, p_hallucinate=1.0), train):
        first, extra = split_sentences(_answer(conv))
        assert parse_claim(first) == it.asked
        s, rel, v = parse_claim(extra)
        assert s == it.asked[0] and v not in {f[2] for f in it.facts}      # same person, a value never stated
        assert check_answer(it, _answer(conv))["n_unsupported"] == 1
    big = make_items(2000, seed=3)
    rate = sum(check_answer(it, _answer(c))["n_unsupported"] for c, it in zip(sft_examples(big, 1, 0.3), big))
    assert abs(rate / len(big) - 0.3) < 0.04


def test_verification_examples_are_balanced_and_correct(train):
    convs = verification_examples(train, seed=0)
    assert len(convs) == 2 * len(train)
    labels = [_answer(c) for c in convs]
    assert labels.count("yes") == labels.count("no") == len(train)
    swapped = 0
    for i, conv in enumerate(convs):
        it = train[i // 2]
        assert {_answer(convs[i - i % 2]), _answer(convs[i - i % 2 + 1])} == {"yes", "no"}
        prefix, suffix = f"Passage: {it.passage}\nQuestion: Is it true that ", "? Please answer yes or no."
        user = conv[0]["content"]
        assert user.startswith(prefix) and user.endswith(suffix)
        fact = parse_claim(user[len(prefix):-len(suffix)])
        assert _answer(conv) == ("yes" if fact in it.facts else "no")
        assert user == labeler_prompt(it.passage, claim_to_question(render_fact(fact)))
        swapped += _answer(conv) == "no" and any(f[1:] == fact[1:] and f[0] != fact[0] for f in it.facts)
    assert swapped > 0                                   # some negatives are another person's fact


def test_pretraining_texts(train):
    texts = pretraining_texts(train[:50])
    assert len(texts) == 100
    for it, qa, check in zip(train, texts[0::2], texts[1::2]):
        assert qa == f"{it.prompt}\n{it.answer}"
        assert check.startswith(f"Passage: {it.passage}\nQuestion: Is it true that ") and check[-3:] in ("yes", "\nno")


# ----------------------------------------------------------------------------- evaluation

class ScriptedModel(torch.nn.Module):
    """Answers each prompt with a fixed text (by prompt ids), through ElleciLM's `generate` interface."""

    def __init__(self, tok, answers: dict[tuple, str]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers = tok, answers

    def generate(self, batch, max_new_tokens, eos_token_id, **kw):
        width = max(map(len, batch))
        rows = [self.tok.encode(self.answers[tuple(p)])[:max_new_tokens - 1] + [self.tok.im_end_id] for p in batch]
        n = max(map(len, rows))
        out = torch.full((len(batch), width + n), self.tok.pad_id)
        for b, (p, r) in enumerate(zip(batch, rows)):
            out[b, width - len(p): width] = torch.tensor(p)
            out[b, width: width + len(r)] = torch.tensor(r)
        return out


def test_hallucination_rate_counts_greedy_answers(tmp_path):
    items = make_items(4, seed=9, split="test")
    path = tmp_path / "t.txt"
    path.write_text("\n".join(pretraining_texts(make_items(300, seed=0))), encoding="utf-8")
    tok = Tokenizer.train(path, vocab_size=384, split_digits=True)
    s = items[0].asked[0]
    texts = [items[0].answer,                                         # right, supported
             f"{items[1].answer} {s} is nice.",                       # right + unparseable
             render_fact((items[2].asked[0], items[2].asked[1], "Zurich")),   # wrong value
             f"{items[3].answer} {items[3].answer}"]                  # right twice
    answers = {tuple(tok.apply_chat_template([{"role": "user", "content": it.prompt}], add_generation_prompt=True)): t
               for it, t in zip(items, texts)}
    report = hallucination_rate(completer(ScriptedModel(tok, answers), tok), items, max_new_tokens=64)
    assert report == {"unsupported_per_answer": 0.5, "hallucinated_answers": 0.5, "answer_accuracy": 0.75,
                      "claims_per_answer": 1.5, "n": 4}
