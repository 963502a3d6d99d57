"""Tests for elleci.tasks.lexicon: size, one-to-one pairs, split, derangement baseline."""
import random

import pytest

from elleci.tasks.corpus import WORDS
from elleci.tasks.lexicon import (CONTROL_PAIRS, PAIRS, TRAIN_PAIRS, check_pairs, random_pairs, split_pairs)


def test_size_and_one_to_one():
    assert 300 <= len(PAIRS) <= 400
    its, ens = [it for it, _ in PAIRS], [en for _, en in PAIRS]
    assert len(set(its)) == len(its) and len(set(ens)) == len(ens)
    assert all(it != en for it, en in PAIRS)
    assert all(w == w.lower() and w.isalpha() and " " not in w for w in its + ens)


def test_contains_the_corpus_words():
    assert set(WORDS) <= set(PAIRS)


def test_split_is_disjoint_complete_and_about_ten_percent():
    assert set(TRAIN_PAIRS).isdisjoint(CONTROL_PAIRS)
    assert sorted(TRAIN_PAIRS + CONTROL_PAIRS) == sorted(PAIRS)
    assert len(CONTROL_PAIRS) == round(0.1 * len(PAIRS))
    index = {p: i for i, p in enumerate(PAIRS)}                      # each part keeps lexicon order
    assert [index[p] for p in TRAIN_PAIRS] == sorted(index[p] for p in TRAIN_PAIRS)


def test_split_is_deterministic():
    assert split_pairs(PAIRS) == (TRAIN_PAIRS, CONTROL_PAIRS)
    assert split_pairs(PAIRS, seed=1) == split_pairs(PAIRS, seed=1)
    assert split_pairs(PAIRS, seed=1)[1] != CONTROL_PAIRS
    with pytest.raises(ValueError, match="control_fraction"):
        split_pairs(PAIRS, control_fraction=1.5)


@pytest.mark.parametrize("n", [2, 3, 10, len(PAIRS)])
def test_random_pairs_is_a_derangement(n):
    pairs = PAIRS[:n]
    for seed in range(5):
        mixed = random_pairs(pairs, seed)
        assert [it for it, _ in mixed] == [it for it, _ in pairs]
        assert sorted(en for _, en in mixed) == sorted(en for _, en in pairs)   # a permutation of the English
        assert not set(mixed) & set(pairs)                                      # no word with its translation
    assert random_pairs(pairs, 3) == random_pairs(pairs, 3)
    state = random.getstate()
    random_pairs(pairs, 0)
    assert random.getstate() == state


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2"):
        random_pairs(PAIRS[:1])
    with pytest.raises(ValueError, match="'cane' occurs twice"):
        check_pairs([("cane", "dog"), ("cane", "hound")])
    with pytest.raises(ValueError, match="'dog' occurs twice"):
        check_pairs([("cane", "dog"), ("cagnolino", "dog")])
    with pytest.raises(ValueError, match="same spelling"):
        check_pairs([("radio", "radio")])
    with pytest.raises(ValueError, match="single lowercase word"):
        check_pairs([("Cane", "dog")])
