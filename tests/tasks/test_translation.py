"""The IT→EN word-translation task and the pipeline's lexicon pretraining option."""
import re
from collections import Counter
from dataclasses import replace

import pytest

from elleci.tasks import lexicon, translation
from elleci.testbed.pipeline import QUICK, BaseConfig, base_key, problems, pretraining_texts


def test_pretraining_texts_state_every_pair_repeats_times():
    pairs = lexicon.PAIRS[:20]
    docs = translation.pretraining_texts(pairs, seed=3, repeats=3, per_doc=4)
    text = " ".join(docs)
    sentences = [s + "." for s in text.split(". ") if s]
    assert len(sentences) == 60 and len(docs) == 15
    seen = Counter()
    for s in sentences:
        for it, en in pairs:
            if any(s.rstrip(".") == t.format(it=it, en=en).rstrip(".") for t in translation.TEXT_TEMPLATES):
                seen[it] += 1
    assert all(seen[it] == 3 for it, _ in pairs)
    assert translation.pretraining_texts(pairs, seed=3, repeats=3) == docs          # deterministic
    assert translation.pretraining_texts(pairs, seed=4, repeats=3) != docs


def test_sft_examples_and_verify():
    conv = translation.sft_examples([("cane", "dog")])[0]
    assert conv == [{"role": "user", "content": "Translate to English: cane"}, {"role": "assistant", "content": "dog"}]
    pair = ("cane", "dog")
    assert translation.verify(pair, "dog") and translation.verify(pair, " Dog.\nmore text")
    assert not translation.verify(pair, "dogs") and not translation.verify(pair, "") and not translation.verify(pair, "a dog")
    with pytest.raises(ValueError, match="pair 1"):
        translation.sft_examples([("cane", "dog"), ("gatto",)])
    with pytest.raises(ValueError, match="no word pairs"):
        translation.evaluate(None, [])


def test_evaluate_counts_exact_matches():
    answers = {"cane": "dog", "gatto": "mouse", "casa": "House."}
    pairs = [("cane", "dog"), ("gatto", "cat"), ("casa", "house")]

    def fake_complete(prompts, **kw):             # a completion function: chat prompts -> response texts
        return [answers[m[0]["content"].split(": ")[1]] for m in prompts]
    assert translation.evaluate(fake_complete, pairs) == {"accuracy": 2 / 3, "n": 3, "correct": 2}


def test_lexicon_option_adds_the_pairs_and_keeps_old_base_keys():
    cfg = BaseConfig(seed=0, **QUICK["base"])
    train, _ = problems(cfg)
    plain, lex = pretraining_texts(cfg, train), pretraining_texts(replace(cfg, lexicon=True), train)
    extra = Counter(lex) - Counter(plain)
    assert sum(extra.values()) == len(lex) - len(plain) > 0
    joined = " ".join(extra)
    assert all(re.search(rf"(?<!\w){re.escape(it)}(?!\w)", joined) for it, _ in lexicon.PAIRS)
    # bases cached before the field existed keep their key; the lexicon base gets another one
    assert base_key(BaseConfig(seed=0)) == "seed0-c93803de9a"
    assert base_key(BaseConfig(seed=0, lexicon=True)) != base_key(BaseConfig(seed=0))
