"""Grounded question answering over short passages: a hallucination benchmark for a tiny model.

A passage states a few templated facts about invented people; the question asks for one of them and
the reference answer restates it as one claim sentence:

    Passage:  "Anna lives in Milan. Anna has a dog. Marco works as a baker. Marco likes tea."
    Question: "Where does Anna live?"
    Answer:   "Anna lives in Milan."

Four relations, each with one sentence template and eight values (`RELATIONS`); sixteen names. An
answer is a sequence of claim sentences; `parse_claim` reads a sentence back into a
(subject, relation, value) fact, and `check_answer` counts the claims that are *unsupported*: the
sentence does not parse, or its fact is not stated in the passage (a wrong value, a relation the
passage does not mention for that person, or another person's fact). Held-out items are those whose
passage hashes (SHA-256) into a fixed fifth of the space, so `split="train"` and `split="test"` never
share a passage. Everything is deterministic given the seed; no global RNG is used.

    train, test = make_items(2000, seed=0), make_items(200, seed=1, split="test")
    sft = sft_examples(train, seed=0, p_hallucinate=0.3)   # answer + one extra claim, sometimes made up
    sft += verification_examples(train, seed=0)            # "Is it true that ...? Please answer yes or no."
    report = hallucination_rate(completer(model, tokenizer), test)    # greedy answers, unsupported claims per answer

The SFT answers deliberately add one extra claim about the same person which, with probability
`p_hallucinate`, is not supported by the passage (a value the passage never mentions): a model tuned on
them hallucinates at a measurable rate, which RLAIF-V (`elleci.algos.alignment.rlaif_v`) should lower. The
verification examples teach the yes/no skill the (self-)labeler needs, in exactly the labeler's
prompt format (`verify_prompt`, equal to `elleci.algos.judging.labeler_prompt`).
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass


SPLITS = ("train", "test")
TEST_FRACTION = 0.2
NAMES = ("Anna", "Marco", "Luca", "Sara", "Paolo", "Giulia", "Elena", "Davide",
         "Chiara", "Matteo", "Laura", "Pietro", "Marta", "Franco", "Rosa", "Bruno")


@dataclass(frozen=True)
class Relation:
    statement: str        # "{s} lives in {v}."
    question: str         # "Where does {s} live?"
    values: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "lives_in": Relation("{s} lives in {v}.", "Where does {s} live?",
                         ("Milan", "Rome", "Turin", "Naples", "Venice", "Florence", "Genoa", "Bologna")),
    "works_as": Relation("{s} works as a {v}.", "What is the job of {s}?",
                         ("baker", "teacher", "doctor", "farmer", "painter", "pilot", "nurse", "tailor")),
    "has_pet": Relation("{s} has a {v}.", "What pet does {s} have?",
                        ("dog", "cat", "horse", "parrot", "rabbit", "goat", "duck", "turtle")),
    "likes": Relation("{s} likes {v}.", "What does {s} like?",
                      ("tea", "coffee", "milk", "juice", "cheese", "bread", "pasta", "soup")),
}
_CLAIM_RES = {rel: re.compile("^" + re.escape(r.statement.rstrip("."))
                              .replace(re.escape("{s}"), r"([A-Za-z]+)").replace(re.escape("{v}"), r"([A-Za-z]+)")
                              + r"\s*\.?$") for rel, r in RELATIONS.items()}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")

Fact = tuple[str, str, str]  # (subject, relation, value)
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Item:
    """One passage, a question about one of its facts (`asked`) and the reference answer."""
    passage: str
    question: str
    facts: tuple[Fact, ...]
    asked: Fact
    answer: str

    @property
    def prompt(self) -> str:
        """The user turn the policy answers (also what `elleci.algos.alignment.rlaif_v.collect_pairs` reads)."""
        return f"Passage: {self.passage}\nQuestion: {self.question}"


# ----------------------------------------------------------------------------- claims

def render_fact(fact: Fact) -> str:
    """(subject, relation, value) -> its claim sentence, e.g. "Anna lives in Milan."."""
    s, rel, v = fact
    return RELATIONS[rel].statement.format(s=s, v=v)


def parse_claim(sentence: str) -> Fact | None:
    """A claim sentence (final period optional) -> (subject, relation, value), or None if no template fits."""
    text = sentence.strip()
    for rel, pattern in _CLAIM_RES.items():
        m = pattern.match(text)
        if m:
            return m.group(1), rel, m.group(2)
    return None


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after ".", "!" or "?" followed by whitespace, and at newlines."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


# ----------------------------------------------------------------------------- items

def is_test_passage(passage: str) -> bool:
    """True for the held-out fifth of all passages (a fixed SHA-256 hash of the text)."""
    h = int.from_bytes(hashlib.sha256(passage.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < TEST_FRACTION * 1000


def _draw_item(rng: random.Random, people: int, facts_per_person: tuple[int, int]) -> Item:
    facts: list[Fact] = []
    for name in rng.sample(NAMES, people):
        for rel in rng.sample(sorted(RELATIONS), rng.randint(*facts_per_person)):
            facts.append((name, rel, rng.choice(RELATIONS[rel].values)))
    passage = " ".join(map(render_fact, facts))
    asked = rng.choice(facts)
    question = RELATIONS[asked[1]].question.format(s=asked[0])
    return Item(passage, question, tuple(facts), asked, render_fact(asked))


def make_items(n: int, seed: int = 0, split: str = "train", *, people: int = 2,
               facts_per_person: tuple[int, int] = (2, 3)) -> list[Item]:
    """`n` items of `split` ("train" | "test"): passages about `people` distinct people, each with a
    number of facts drawn from `facts_per_person` (inclusive range, distinct relations, people's facts
    in order). Deterministic given the arguments; the first k items do not depend on n."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lo, hi = facts_per_person
    if not (1 <= people <= len(NAMES) and 1 <= lo <= hi <= len(RELATIONS)):
        raise ValueError(f"need 1 <= people <= {len(NAMES)} and 1 <= lo <= hi <= {len(RELATIONS)}, "
                         f"got people={people}, facts_per_person={facts_per_person}")
    rng, out = random.Random(f"grounded_qa/{seed}/{split}/{people}/{lo}-{hi}"), []
    while len(out) < n:
        item = _draw_item(rng, people, (lo, hi))
        if is_test_passage(item.passage) == (split == "test"):
            out.append(item)
    return out


# ----------------------------------------------------------------------------- checking and scoring

def check_answer(item: Item, text: str) -> dict:
    """{"n_claims", "n_unsupported", "answered_correctly"} for an answer to `item`.

    Every sentence is a claim; it is unsupported when it does not parse or its fact is not in
    `item.facts`. answered_correctly: the asked fact is among the answer's claims.
    """
    facts = [parse_claim(s) for s in split_sentences(text)]
    known = set(item.facts)
    return {"n_claims": len(facts), "n_unsupported": sum(f is None or f not in known for f in facts),
            "answered_correctly": item.asked in facts}


def hallucination_rate(complete, items: Sequence[Item], *, max_new_tokens: int = 32,
                       temperature: float = 0.0, seed: int = 0, batch_size: int = 64) -> dict:
    """Answer every item with `complete` (a completion function, `elleci.testbed.completion.completer`;
    greedy by default) and check the claims.

    Returns {"unsupported_per_answer", "hallucinated_answers" (fraction with >= 1 unsupported claim, the
    response-level rate of Object HalBench), "answer_accuracy", "claims_per_answer", "n"}.
    """
    items = list(items)
    if not items:
        raise ValueError("hallucination_rate needs at least one item")
    texts = complete([it.prompt for it in items], max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, batch_size=batch_size)
    checks = [check_answer(it, t) for it, t in zip(items, texts)]
    n = len(checks)
    return {"unsupported_per_answer": sum(c["n_unsupported"] for c in checks) / n,
            "hallucinated_answers": sum(c["n_unsupported"] > 0 for c in checks) / n,
            "answer_accuracy": sum(c["answered_correctly"] for c in checks) / n,
            "claims_per_answer": sum(c["n_claims"] for c in checks) / n, "n": n}


# ----------------------------------------------------------------------------- training data

def prompt_messages(item: Item) -> Messages:
    """The chat prompt of an item: one user message holding the passage and the question."""
    return [{"role": "user", "content": item.prompt}]


def _passage_values(item: Item) -> set[str]:
    return {v for _, _, v in item.facts}


def unsupported_fact(item: Item, subject: str, rng: random.Random) -> Fact:
    """A plausible fact about `subject` whose value the passage never mentions (so it is unsupported)."""
    used = _passage_values(item)
    options = {rel: [v for v in r.values if v not in used] for rel, r in RELATIONS.items()}
    rel = rng.choice(sorted(rel for rel, vs in options.items() if vs))   # passages never use every value
    return subject, rel, rng.choice(options[rel])


def sft_examples(items: Sequence[Item], seed: int = 0, p_hallucinate: float = 0.3) -> list[Messages]:
    """[user prompt, assistant answer] conversations whose answer is the asked fact plus one extra claim
    about the same person: with probability `p_hallucinate` an unsupported one (`unsupported_fact`), else
    another fact of that person from the passage (or, if it has none, the answer alone)."""
    if not 0.0 <= p_hallucinate <= 1.0:
        raise ValueError(f"p_hallucinate must be in [0, 1], got {p_hallucinate}")
    rng, out = random.Random(f"grounded_qa/sft/{seed}"), []
    for it in items:
        subject = it.asked[0]
        others = [f for f in it.facts if f[0] == subject and f != it.asked]
        if rng.random() < p_hallucinate:
            extra = [unsupported_fact(it, subject, rng)]
        else:
            extra = [rng.choice(others)] if others else []
        answer = " ".join(render_fact(f) for f in [it.asked, *extra])
        out.append(prompt_messages(it) + [{"role": "assistant", "content": answer}])
    return out


def _false_fact(item: Item, rng: random.Random) -> Fact:
    """An unsupported claim: a made-up value, or another person's fact attributed to the wrong person."""
    subjects = sorted({s for s, _, _ in item.facts})
    subject = rng.choice(subjects)
    if len(subjects) > 1 and rng.random() < 0.3:
        _, rel, v = rng.choice([f for f in item.facts if f[0] != subject])
        if (subject, rel, v) not in item.facts:
            return subject, rel, v
    return unsupported_fact(item, subject, rng)


def verify_prompt(passage: str, claim: str) -> str:
    """The yes/no check of a claim against the passage, in the format of RLAIF-V's labeler
    (`elleci.algos.judging.labeler_prompt(passage, claim_to_question(claim))`, which a test holds equal):
    "Passage: {passage}\\nQuestion: Is it true that {claim}? Please answer yes or no."."""
    core = claim.strip().rstrip(".!?").strip()
    if not core:
        raise ValueError("empty claim")
    return f"Passage: {passage}\nQuestion: Is it true that {core}? Please answer yes or no."


def verification_examples(items: Sequence[Item], seed: int = 0) -> list[Messages]:
    """Two yes/no conversations per item, one "yes" (a fact of the passage) and one "no" (unsupported),
    in random order. The user turn is `verify_prompt(passage, claim)`:
    "Passage: ...\\nQuestion: Is it true that <claim>? Please answer yes or no."."""
    rng, out = random.Random(f"grounded_qa/verify/{seed}"), []
    for it in items:
        pair = [(rng.choice(it.facts), "yes"), (_false_fact(it, rng), "no")]
        rng.shuffle(pair)
        for fact, label in pair:
            out.append([{"role": "user", "content": verify_prompt(it.passage, render_fact(fact))},
                        {"role": "assistant", "content": label}])
    return out


def pretraining_texts(items: Sequence[Item], seed: int = 0) -> list[str]:
    """Plain text for a base model (and its tokenizer), in the prompts' own words: per item the passage,
    question and answer written out, and one yes/no check of a claim in the labeler's format."""
    rng, texts = random.Random(f"grounded_qa/pretrain/{seed}"), []
    for it in items:
        texts.append(f"{it.prompt}\n{it.answer}")
        fact, label = (rng.choice(it.facts), "yes") if rng.random() < 0.5 else (_false_fact(it, rng), "no")
        texts.append(f"{verify_prompt(it.passage, render_fact(fact))}\n{label}")
    return texts
