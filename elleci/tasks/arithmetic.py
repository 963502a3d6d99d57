"""A verifiable arithmetic task for showing SFT / DPO / UNA / GRPO at work on a tiny model.

Questions are short, language-neutral expressions on small non-negative integers, and solutions are
worked line by line, one operation per line, ending with a fixed final-answer line:

    level 1  a + b, one digit each            "3 + 5 = ?"       -> "3 + 5 = 8\\nAnswer: 8"
    level 2  a + b or a - b, two digits each  "47 - 18 = ?"     -> "47 - 18 = 29\\nAnswer: 29"
    level 3  a op b op c, one digit each,     "4 + 7 - 3 = ?"   -> "4 + 7 = 11\\n11 - 3 = 8\\nAnswer: 8"
             op in {+, -}

Only + and - appear, evaluated left to right (which is also the usual precedence), and a - b is only
drawn when the running value is >= b, so every intermediate result and answer is >= 0.

`extract_answer` reads the integer on the *last* "Answer: <int>" line fragment; `verify` compares it
with the problem's answer. Held-out problems are those whose question hashes (SHA-256) into a fixed
fifth of the space (`is_test_question`), so `split="train"` and `split="test"` never share a question,
whatever the seeds. Problems are drawn with replacement (level 1 has only 100 distinct questions, 20
of them held out). Everything is deterministic given the seed; no global RNG is used.

    train = make_problems(2000, seed=0, levels=(1,), split="train")
    sft = sft_examples(train)                      # [[user msg, assistant msg], ...]
    pairs = preference_pairs(train, seed=0)        # {"prompt", "chosen", "rejected"}
    report = evaluate(completer(model, tokenizer), make_problems(200, seed=1, levels=(1,), split="test"))
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass


LEVELS = (1, 2, 3)
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
ANSWER_PREFIX = "Answer: "
_ANSWER_RE = re.compile(r"Answer\s*:\s*([+-]?\d+)(?!\w|\.\d)")
_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")

Messages = list[dict[str, str]]
Step = tuple[int, str, int]  # (left operand, operator, right operand)


@dataclass(frozen=True)
class Problem:
    """One question with its integer answer and its worked solution text."""
    question: str
    answer: int
    solution: str
    level: int


# ----------------------------------------------------------------------------- problems

def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def _operands_and_ops(rng: random.Random, level: int) -> tuple[list[int], list[str]]:
    """Draw the numbers and operators of one problem of `level`."""
    if level == 1:
        return [rng.randint(0, 9), rng.randint(0, 9)], ["+"]
    if level == 2:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
        return ([max(a, b), min(a, b)] if op == "-" else [a, b]), [op]
    nums, ops = [rng.randint(0, 9)], []
    value = nums[0]
    for _ in range(2):
        y = rng.randint(0, 9)
        op = rng.choice("+-") if value >= y else "+"  # keep the running value >= 0
        nums.append(y)
        ops.append(op)
        value = _apply(value, op, y)
    return nums, ops


def _steps(nums: Sequence[int], ops: Sequence[str]) -> list[Step]:
    """Left-to-right steps: the left operand of each step is the previous step's result."""
    steps, value = [], nums[0]
    for op, y in zip(ops, nums[1:]):
        steps.append((value, op, y))
        value = _apply(value, op, y)
    return steps


def render_solution(steps: Sequence[Step], results: Sequence[int]) -> str:
    """One "x op y = r" line per step, then "Answer: <last result>"."""
    lines = [f"{x} {op} {y} = {r}" for (x, op, y), r in zip(steps, results)]
    return "\n".join(lines + [f"{ANSWER_PREFIX}{results[-1]}"])


def make_problem(nums: Sequence[int], ops: Sequence[str], level: int) -> Problem:
    """The `Problem` for the expression nums[0] ops[0] nums[1] ... (evaluated left to right)."""
    if len(nums) != len(ops) + 1 or not ops or any(op not in "+-" for op in ops):
        raise ValueError(f"need k >= 1 operators in '+-' and k + 1 numbers, got {nums!r}, {ops!r}")
    steps = _steps(nums, ops)
    results = [_apply(*s) for s in steps]
    question = " ".join([str(nums[0])] + [f"{op} {y}" for op, y in zip(ops, nums[1:])]) + " = ?"
    return Problem(question, results[-1], render_solution(steps, results), level)


def is_test_question(question: str) -> bool:
    """True for the held-out fifth of all questions (a fixed SHA-256 hash of the text)."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < TEST_FRACTION * 1000


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels!r}")
    return levels


def make_problems(n: int, seed: int = 0, levels: Sequence[int] = LEVELS, split: str = "train") -> list[Problem]:
    """`n` problems, each of a level drawn uniformly from `levels`, all in `split` ("train" | "test").

    Deterministic given (n, seed, levels, split); the first k problems do not depend on n.
    """
    levels = _check_levels(levels)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng, out = random.Random(f"arithmetic/{seed}/{split}"), []
    while len(out) < n:
        level = rng.choice(levels)
        problem = make_problem(*_operands_and_ops(rng, level), level)
        if is_test_question(problem.question) == (split == "test"):
            out.append(problem)
    return out


# ----------------------------------------------------------------------------- checking and scoring

def extract_answer(text: str) -> int | None:
    """The integer of the last "Answer: <int>" in `text` (spaces around ":" allowed), else None."""
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1]) if matches else None


def verify(problem: Problem, text: str) -> bool:
    """True when the final answer in `text` equals `problem.answer`."""
    return extract_answer(text) == problem.answer


def score(problem: Problem, text: str) -> float:
    """Graded credit in [0, 1]: 1.0 iff `verify`, else partial credit below 1.

    For a wrong final answer p (answer a): 0.5 * max(0, 1 - |p - a| / max(1, |a|))  (closeness)
    + 0.4 * (fraction of the reference solution's "x op y = r" lines that appear, correct, in `text`).
    No parseable answer scores 0. A wrong answer therefore scores at most 0.9.
    """
    if verify(problem, text):
        return 1.0
    pred = extract_answer(text)
    if pred is None:
        return 0.0
    closeness = max(0.0, 1.0 - abs(pred - problem.answer) / max(1, abs(problem.answer)))
    ref_steps = [m.groups() for m in map(_STEP_RE.match, problem.solution.splitlines()) if m]
    got_steps = {m.groups() for m in map(_STEP_RE.match, text.splitlines()) if m}
    step_credit = sum(s in got_steps for s in ref_steps) / max(1, len(ref_steps))
    return 0.5 * closeness + 0.4 * step_credit


# ----------------------------------------------------------------------------- wrong solutions

def _parse_question(question: str) -> tuple[list[int], list[str]]:
    tokens = question.removesuffix(" = ?").split()
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def _no_carry(x: int, op: str, y: int) -> int:
    """x op y done digit by digit, forgetting every carry (+) or taking |dx - dy| per digit (-)."""
    digits, place = 0, 1
    while x or y:
        dx, dy = x % 10, y % 10
        digits += ((dx + dy) % 10 if op == "+" else abs(dx - dy)) * place
        x, y, place = x // 10, y // 10, place * 10
    return digits


def _wrong_results(x: int, op: str, y: int) -> dict[str, int]:
    """Plausible wrong results of one step, by kind; each differs from the right result."""
    right = _apply(x, op, y)
    candidates = {"off_by_one+": right + 1, "off_by_one-": right - 1, "tens_slip": right + (10 if right < 10 else -10),
                  "wrong_op": _apply(x, "-" if op == "+" else "+", y), "carry": _no_carry(x, op, y)}
    return {kind: r for kind, r in candidates.items() if r != right}


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """A plausible solution with one slip in one step (off by one, tens slip, wrong operation or a
    forgotten carry/borrow), carried through the later steps; its final answer is always wrong."""
    steps = _steps(*_parse_question(problem.question))
    k = rng.randrange(len(steps))
    kinds = _wrong_results(*steps[k])
    bad = kinds[rng.choice(sorted(kinds))]
    new_steps, results = [], []
    for i, (x, op, y) in enumerate(steps):
        x = results[-1] if results else x
        new_steps.append((x, op, y))
        results.append(bad if i == k else _apply(x, op, y))
    return render_solution(new_steps, results)


# ----------------------------------------------------------------------------- training data

def prompt_messages(problem: Problem) -> Messages:
    """The chat prompt of a problem: one user message holding the question."""
    return [{"role": "user", "content": problem.question}]


def sft_examples(problems: Sequence[Problem]) -> list[Messages]:
    """[user question, assistant solution] conversations for supervised fine-tuning."""
    return [prompt_messages(p) + [{"role": "assistant", "content": p.solution}] for p in problems]


def preference_pairs(problems: Sequence[Problem], seed: int = 0) -> list[dict]:
    """{"prompt": messages, "chosen": right solution, "rejected": plausible wrong solution} per problem."""
    rng = random.Random(f"pairs/{seed}")
    return [{"prompt": prompt_messages(p), "chosen": p.solution, "rejected": wrong_solution(p, rng)}
            for p in problems]


def _completions(problems: Sequence[Problem], seed: int, p_good: float, salt: str):
    if not 0.0 <= p_good <= 1.0:
        raise ValueError(f"p_good must be in [0, 1], got {p_good}")
    rng = random.Random(f"{salt}/{seed}")
    for p in problems:
        yield p, (p.solution if rng.random() < p_good else wrong_solution(p, rng))


def binary_feedback(problems: Sequence[Problem], seed: int = 0, p_good: float = 0.5) -> list[dict]:
    """{"prompt", "completion", "label"}: the right solution with probability p_good (label 1), else
    a wrong one (label 0); label == int(verify(problem, completion))."""
    return [{"prompt": prompt_messages(p), "completion": c, "label": int(verify(p, c))}
            for p, c in _completions(problems, seed, p_good, "binary")]


def scored_feedback(problems: Sequence[Problem], seed: int = 0, p_good: float = 0.5) -> list[dict]:
    """{"prompt", "completion", "score"} with completions drawn as in `binary_feedback` and
    score = `score(problem, completion)` (1.0 iff correct; graded partial credit < 1 otherwise)."""
    return [{"prompt": prompt_messages(p), "completion": c, "score": score(p, c)}
            for p, c in _completions(problems, seed, p_good, "scored")]


# ----------------------------------------------------------------------------- evaluation

def generate_completions(complete, problems: Sequence[Problem], *, max_new_tokens: int = 32,
                         batch_size: int = 32) -> list[str]:
    """Greedy completions of each problem's chat prompt by `complete`, a completion function
    (`elleci.testbed.completion.completer(model, tok)`: new tokens only, cut at the first stop token)."""
    return complete([prompt_messages(p) for p in problems], max_new_tokens=max_new_tokens, temperature=0.0,
                    batch_size=batch_size)


def evaluate(complete, problems: Sequence[Problem], *, max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    """Greedy-decoding accuracy: {"accuracy", "n", "correct", "accuracy_by_level": {level: acc}}, the
    responses written by `complete` (a completion function, see `generate_completions`)."""
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    texts = generate_completions(complete, problems, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ok = [verify(p, t) for p, t in zip(problems, texts)]
    by_level: dict[int, list[bool]] = {}
    for p, good in zip(problems, ok):
        by_level.setdefault(p.level, []).append(good)
    return {"accuracy": sum(ok) / len(ok), "n": len(ok), "correct": sum(ok),
            "accuracy_by_level": {lv: sum(v) / len(v) for lv, v in sorted(by_level.items())}}
