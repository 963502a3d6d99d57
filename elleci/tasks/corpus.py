"""A generated bilingual (Italian/English) text corpus for pre-training tiny models on CPU.

Each document is a few sentences from simple templates whose content is checkable: counting,
small-number arithmetic, weekdays in order, colours of things and IT-EN word pairs, e.g.

    "Tre più quattro fa sette. Dopo lunedì viene martedì. Il cielo è azzurro."
    "Three plus four is seven. After Monday comes Tuesday. The sky is blue."

A model that learns the corpus has to learn number words, their order and sums, in both languages:
enough structure that a falling loss means something and a continuation can be read. Deterministic
for a given seed.
"""
from __future__ import annotations

import random

NUMBERS = {
    "it": ["zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove", "dieci",
           "undici", "dodici", "tredici", "quattordici", "quindici", "sedici", "diciassette", "diciotto",
           "diciannove", "venti"],
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"],
}
DAYS = {"it": ["lunedì", "martedì", "mercoledì", "giovedì", "venerdì", "sabato", "domenica"],
        "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]}
COLOURS = [("il cielo", "azzurro", "the sky", "blue"), ("l'erba", "verde", "the grass", "green"),
           ("la neve", "bianca", "the snow", "white"), ("il carbone", "nero", "coal", "black"),
           ("il limone", "giallo", "the lemon", "yellow"), ("la fragola", "rossa", "the strawberry", "red"),
           ("l'arancia", "arancione", "the orange", "orange"), ("il mare", "blu", "the sea", "blue")]
WORDS = [("cane", "dog"), ("gatto", "cat"), ("casa", "house"), ("libro", "book"), ("acqua", "water"),
         ("pane", "bread"), ("sole", "sun"), ("luna", "moon"), ("albero", "tree"), ("strada", "road"),
         ("mela", "apple"), ("scuola", "school"), ("amico", "friend"), ("città", "city"), ("fiume", "river")]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _sum(rng, lang):
    n = NUMBERS[lang]
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    return f"{_cap(n[a])} più {n[b]} fa {n[a + b]}." if lang == "it" else f"{_cap(n[a])} plus {n[b]} is {n[a + b]}."


def _count(rng, lang):
    n = NUMBERS[lang]
    start = rng.randint(0, 14)
    seq = ", ".join(n[start:start + rng.randint(3, 6)])
    return f"Contiamo: {seq}." if lang == "it" else f"Let us count: {seq}."


def _day(rng, lang):
    d = DAYS[lang]
    i = rng.randrange(7)
    return f"Dopo {d[i]} viene {d[(i + 1) % 7]}." if lang == "it" else f"After {d[i]} comes {d[(i + 1) % 7]}."


def _colour(rng, lang):
    it_thing, it_col, en_thing, en_col = rng.choice(COLOURS)
    return f"{_cap(it_thing)} è {it_col}." if lang == "it" else f"{_cap(en_thing)} is {en_col}."


def _word(rng, lang):
    it, en = rng.choice(WORDS)
    return f"In inglese {it} si dice {en}." if lang == "it" else f"In Italian {en} is {it}."


TEMPLATES = [_sum, _count, _day, _colour, _word]


def synthetic_corpus(n_docs: int = 20_000, seed: int = 0, sentences: tuple[int, int] = (3, 6)) -> list[str]:
    """`n_docs` documents, each one language (half Italian, half English) and 3-6 template sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lang = rng.choice(("it", "en"))
        docs.append(" ".join(rng.choice(TEMPLATES)(rng, lang) for _ in range(rng.randint(*sentences))))
    return docs
