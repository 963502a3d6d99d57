"""Many small instruction tasks in one format, and a checkable response style: data for two-stage tuning.

Every example has a prompt, a short canonical answer, a terse response (stage 1: the skill) and the
working a styled response shows (stage 2: the format). The styled response is a fixed opening line, the
working (if any), and a final line that states the answer:

    task      prompt                                   terse response              styled response
    add-1     "3 + 5 = ?"                              "3 + 5 = 8\\nAnswer: 8"     "Sure!\\n3 + 5 = 8\\nFinal answer: 8"
    arith-2   "47 - 18 = ?"   (two digits, + or -)     worked steps + "Answer: …"  opening, steps, final line
    arith-3   "4 + 7 - 3 = ?" (three one-digit terms)  worked steps + "Answer: …"  opening, steps, final line
    it-en     "Translate to English: cane"             "dog"                       "Sure!\\nFinal answer: dog"
    lang-id   "Which language is the word cane?"       "Italian"                   "Sure!\\nFinal answer: Italian"
    qa        "Passage: …\\nQuestion: Where does …?"   "Anna lives in Milan."      "Sure!\\n<terse>\\nFinal answer: Milan"
    copy      "Copy: b e a"                            "b e a"                     "Sure!\\nFinal answer: b e a"
    reverse   "Reverse: 3 8 1"                         "1 8 3"                     "Sure!\\nFinal answer: 1 8 3"
    count     "How many words: cat sun dog"            "3"                         "Sure!\\nFinal answer: 3"
    compare   "Which is larger: 47 or 52?"             "52"                        "Sure!\\nFinal answer: 52"

Arithmetic comes from `elleci.tasks.arithmetic` (its own held-out split), translation from
`elleci.tasks.translation` (training words `TRAIN_PAIRS`, held-out `CONTROL_PAIRS`), grounded QA from
`elleci.tasks.grounded_qa` (one person, one or two facts per passage), lang-id from the lexicon's words; the others are
generated here. Outside arithmetic and translation, held-out prompts are those whose SHA-256 hash falls in
a fixed fifth of the space, so `split="train"` and `split="test"` never share a prompt. Every task's
examples have distinct prompts; deterministic in the seed, no global RNG.

    tasks = make_tasks(TASKS, 1500, seed=0)                      # {task: [Example]} (small spaces give fewer)
    conv = conversation(tasks["reverse"][0], style=True)        # [user, assistant] messages
    follows_style("Sure!\\nFinal answer: 1 8 3")                  # True
    report = evaluate(completer(model, tok, sort_by_length=True), make_tasks(TASKS, 40, seed=1000, split="test"))
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import arithmetic, grounded_qa, lexicon, translation
from .corpus import WORDS

OPENING = "Sure!"
FINAL = "Final answer: "
TASKS = ("add-1", "arith-2", "arith-3", "it-en", "lang-id", "qa", "copy", "reverse", "count", "compare")
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
_FINAL_RE = re.compile(r"^Final answer:[ \t]*(\S.*?)\s*$")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One instruction: the prompt, its canonical short answer, the terse (stage-1) response and the
    working shown by the styled (stage-2) response between the opening and the final line."""
    task: str
    prompt: str
    answer: str
    terse: str
    work: str = ""


# ----------------------------------------------------------------------------------------- the style

def styled(ex: Example) -> str:
    """OPENING, the working (if any), then "Final answer: <answer>", one per line."""
    return "\n".join([OPENING] + ([ex.work] if ex.work else []) + [FINAL + ex.answer])


def response(ex: Example, style: bool) -> str:
    return styled(ex) if style else ex.terse


def conversation(ex: Example, style: bool = False) -> Messages:
    """[user prompt, assistant response] in the terse (stage 1) or styled (stage 2, `style=True`) format."""
    return [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": response(ex, style)}]


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


def final_answer(text: str) -> str | None:
    """X of the last line when it reads "Final answer: X", else None."""
    lines = _lines(text)
    m = _FINAL_RE.match(lines[-1]) if lines else None
    return m.group(1) if m else None


def follows_style(text: str) -> bool:
    """True iff the first line is exactly OPENING, the last is "Final answer: X" with X non-empty, and
    no other line is a final-answer line."""
    lines = _lines(text)
    return (len(lines) >= 2 and lines[0] == OPENING and final_answer(text) is not None
            and not any(_FINAL_RE.match(ln) for ln in lines[1:-1]))


# ----------------------------------------------------------------------------------------- checking

def normalise(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding spaces and punctuation stripped."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", " ".join(text.lower().split()))


def is_correct(ex: Example, text: str) -> bool:
    """Is the response's answer right, in whichever format it is written? A "Final answer: X" last line is
    read as the answer; otherwise (a leading OPENING line dropped) the terse format: "Answer: N" for
    arithmetic, the asked claim among the sentences for qa, the first line for the rest."""
    final = final_answer(text)
    if final is not None:
        return normalise(final) == normalise(ex.answer)
    lines = _lines(text)
    if lines and lines[0] == OPENING:
        lines = lines[1:]
    body = "\n".join(lines)
    if ex.task in ("add-1", "arith-2", "arith-3"):
        return arithmetic.extract_answer(body) == int(ex.answer)
    if ex.task == "qa":
        asked = grounded_qa.parse_claim(ex.terse)
        return asked in {grounded_qa.parse_claim(s) for s in grounded_qa.split_sentences(body)}
    return bool(lines) and normalise(lines[0]) == normalise(ex.answer)


# ----------------------------------------------------------------------------------------- the tasks

def is_test_prompt(prompt: str) -> bool:
    """True for the held-out fifth of all prompts (a fixed SHA-256 hash of the text)."""
    h = int.from_bytes(hashlib.sha256(f"instructions/{prompt}".encode("utf-8")).digest()[:8], "big")
    return h % 1000 < TEST_FRACTION * 1000


def _arithmetic(level: int, name: str):
    def draw(n, seed, split):
        return [Example(name, p.question, str(p.answer), p.solution, p.solution.rsplit("\n", 1)[0])
                for p in arithmetic.make_problems(n, seed=seed, levels=(level,), split=split)]
    return draw


def _translation(n, seed, split):
    pairs = list(lexicon.TRAIN_PAIRS if split == "train" else lexicon.CONTROL_PAIRS)
    random.Random(f"instructions/it-en/{seed}").shuffle(pairs)
    return [Example("it-en", translation.PROMPT.format(it=it), en, en) for it, en in pairs[:n]]


def _qa(n, seed, split):
    return [Example("qa", it.prompt, it.asked[2], it.answer, it.answer)
            for it in grounded_qa.make_items(n, seed=seed, split=split, people=1, facts_per_person=(1, 2))]


LANG_WORDS = tuple((w, "Italian") for w, _ in lexicon.PAIRS) + tuple((w, "English") for _, w in lexicon.PAIRS)
_LETTERS = "abcdefghij"
_NOUNS = tuple(en for _, en in WORDS)


def _lang_id(rng):
    word, lang = rng.choice(LANG_WORDS)
    return f"Which language is the word {word}?", lang


def _copy(rng):
    s = " ".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))
    return f"Copy: {s}", s


def _reverse(rng):
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    return f"Reverse: {' '.join(digits)}", " ".join(reversed(digits))


def _count(rng):
    words = [rng.choice(_NOUNS) for _ in range(rng.randint(2, 6))]
    return f"How many words: {' '.join(words)}", str(len(words))


def _compare(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger: {a} or {b}?", str(max(a, b))


_GENERATED = {"lang-id": _lang_id, "copy": _copy, "reverse": _reverse, "count": _count, "compare": _compare}
_MADE = {"add-1": _arithmetic(1, "add-1"), "arith-2": _arithmetic(2, "arith-2"), "arith-3": _arithmetic(3, "arith-3"),
         "it-en": _translation, "qa": _qa}


def _generated(name: str, n: int, seed: int, split: str, tries_per_example: int = 30) -> list[Example]:
    rng, out, seen = random.Random(f"instructions/{name}/{seed}/{split}"), [], set()
    for _ in range(tries_per_example * n):
        if len(out) == n:
            break
        prompt, answer = _GENERATED[name](rng)
        if prompt not in seen and is_test_prompt(prompt) == (split == "test"):
            seen.add(prompt)
            out.append(Example(name, prompt, answer, answer))
    return out


def _distinct(examples: Sequence[Example], n: int) -> list[Example]:
    seen, out = set(), []
    for ex in examples:
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out[:n]


def make_task(name: str, n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """Up to `n` examples of task `name` with distinct prompts, all from `split` (fewer when the task's
    space is small: add-1 has 80 training questions, it-en 336 training words)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name in _GENERATED:
        return _generated(name, n, seed, split)
    return _distinct(_MADE[name](n if name == "it-en" else 3 * n, seed, split), n)


def make_tasks(names: Sequence[str] = TASKS, n: int = 1000, seed: int = 0, split: str = "train"
               ) -> dict[str, list[Example]]:
    return {name: make_task(name, n, seed, split) for name in names}


# ----------------------------------------------------------------------------------------- evaluation

def evaluate(complete, tasks: Mapping[str, Sequence[Example]], *, max_new_tokens: int = 48,
             batch_size: int = 64) -> dict[str, dict]:
    """Greedy responses to every prompt → {task: {"accuracy", "adherence", "strict", "n"}}: accuracy by
    `is_correct` (either format), adherence by `follows_style`, strict = both. `complete` is a completion
    function (`elleci.testbed.completion.completer(model, tok, sort_by_length=True)`: less padding)."""
    examples = [ex for items in tasks.values() for ex in items]
    if not examples:
        raise ValueError("evaluate needs at least one example")
    texts = complete([ex.prompt for ex in examples], max_new_tokens=max_new_tokens, temperature=0.0,
                     batch_size=batch_size)
    report, k = {}, 0
    for name, items in tasks.items():
        acc = [is_correct(ex, t) for ex, t in zip(items, texts[k:k + len(items)])]
        adh = [follows_style(t) for t in texts[k:k + len(items)]]
        k += len(items)
        n = max(1, len(items))
        report[name] = {"accuracy": sum(acc) / n, "adherence": sum(adh) / n,
                        "strict": sum(a and b for a, b in zip(acc, adh)) / n, "n": len(items)}
    return report
