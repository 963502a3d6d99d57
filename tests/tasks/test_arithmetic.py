"""Tests for elleci.tasks.arithmetic: generation, golden answers, parsing, feedback data, evaluation."""
import random
import re

import pytest
import torch

from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.generation import left_pad
from elleci.model.tokenizer import render_chat
from elleci.testbed.completion import completer
from elleci.tasks.arithmetic import (LEVELS, Problem, binary_feedback, evaluate, extract_answer, generate_completions,
                                     is_test_question, make_problem, make_problems, preference_pairs, score,
                                     scored_feedback, sft_examples, verify, wrong_solution)

LINE = re.compile(r"^(\d+) ([+-]) (\d+) = (-?\d+)$")


def _golden(question: str) -> int:
    """Answer computed independently: Python's own evaluation of the expression (only + and -)."""
    expr = question.removesuffix(" = ?")
    assert re.fullmatch(r"\d+( [+-] \d+)+", expr), question
    return eval(expr)  # noqa: S307 - a checked string of digits, spaces, + and -


@pytest.fixture(scope="module")
def mixed():
    return make_problems(600, seed=3)


# ----------------------------------------------------------------------------- problems

def test_hand_computed_examples():
    p = make_problem([4, 7, 3], ["+", "-"], level=3)
    assert p == Problem("4 + 7 - 3 = ?", 8, "4 + 7 = 11\n11 - 3 = 8\nAnswer: 8", 3)
    assert make_problem([47, 18], ["-"], 2).solution == "47 - 18 = 29\nAnswer: 29"
    assert make_problem([3, 5], ["+"], 1).solution == "3 + 5 = 8\nAnswer: 8"
    with pytest.raises(ValueError):
        make_problem([1, 2], ["*"], 1)


def test_deterministic_given_seed():
    assert make_problems(50, seed=7) == make_problems(50, seed=7)
    assert make_problems(50, seed=7) != make_problems(50, seed=8)
    assert make_problems(20, seed=7) == make_problems(50, seed=7)[:20]
    assert preference_pairs(make_problems(30, seed=1), seed=2) == preference_pairs(make_problems(30, seed=1), seed=2)
    state = random.getstate()
    make_problems(10, seed=0), binary_feedback(make_problems(10), seed=0)
    assert random.getstate() == state  # the global RNG is untouched


def test_golden_answers_and_solutions(mixed):
    assert {p.level for p in mixed} == set(LEVELS)
    for p in mixed:
        assert p.answer == _golden(p.question) >= 0
        assert verify(p, p.solution)
        *steps, last = p.solution.split("\n")
        assert last == f"Answer: {p.answer}"
        assert len(steps) == {1: 1, 2: 1, 3: 2}[p.level]
        prev = None
        for line in steps:
            x, op, y, r = LINE.match(line).groups()
            assert int(r) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
            assert prev is None or int(x) == prev  # each step continues from the previous result
            prev = int(r)
        assert prev == p.answer


def test_level_ranges(mixed):
    for p in mixed:
        nums = [int(t) for t in p.question.split()[0::2][:-1]]
        if p.level == 1:
            assert len(nums) == 2 and all(0 <= n <= 9 for n in nums) and "+" in p.question
        elif p.level == 2:
            assert len(nums) == 2 and all(10 <= n <= 99 for n in nums)
        else:
            assert len(nums) == 3 and all(0 <= n <= 9 for n in nums)


def test_levels_filter_and_bad_inputs():
    assert {p.level for p in make_problems(40, seed=0, levels=(2,))} == {2}
    assert make_problems(0) == []
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        make_problems(5, levels=(4,))
    with pytest.raises(ValueError):
        make_problems(5, levels=())
    with pytest.raises(ValueError):
        make_problems(-1)
    with pytest.raises(ValueError, match="split"):
        make_problems(5, split="dev")


def test_train_test_disjoint():
    train = make_problems(3000, seed=0, split="train")
    test = make_problems(500, seed=0, split="test")
    assert not {p.question for p in train} & {p.question for p in test}
    assert not any(is_test_question(p.question) for p in train)
    assert all(is_test_question(p.question) for p in test)
    # level 1 has 100 questions; roughly a fifth are held out, and train sees all the others
    level1_test = {p.question for p in make_problems(2000, seed=1, levels=(1,), split="test")}
    level1_train = {p.question for p in make_problems(2000, seed=1, levels=(1,), split="train")}
    assert 10 <= len(level1_test) <= 30 and len(level1_test) + len(level1_train) == 100


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, expected", [
    ("Answer: 42", 42), ("3 + 5 = 8\nAnswer: 8", 8), ("Answer:-7", -7), ("Answer :   -12 ", -12),
    ("Answer: 3\nAnswer: 5", 5), ("Answer: 4\nno wait\nAnswer:  +9.", 9), ("the result is 8", None),
    ("", None), ("Answer: x", None), ("Answer: 4x2", None), ("Answer: 4.5", None), ("answer 8", None),
    ("Answer: 7\nAnswer: oops", 7),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_verify():
    p = make_problem([2, 3], ["+"], 1)
    assert verify(p, "Answer: 5") and verify(p, "2 + 3 = 5\nAnswer: 5")
    assert not verify(p, "Answer: 5\nAnswer: 6") and not verify(p, "5") and not verify(p, "")


# ----------------------------------------------------------------------------- training data

def test_sft_examples(mixed):
    convs = sft_examples(mixed[:5])
    assert convs[0] == [{"role": "user", "content": mixed[0].question},
                        {"role": "assistant", "content": mixed[0].solution}]
    assert len(convs) == 5 and all(render_chat(c) for c in convs)  # valid chat messages


def test_preference_pairs(mixed):
    pairs = preference_pairs(mixed, seed=0)
    assert len(pairs) == len(mixed)
    for p, pair in zip(mixed, pairs):
        assert pair["prompt"] == [{"role": "user", "content": p.question}]
        assert verify(p, pair["chosen"]) and not verify(p, pair["rejected"])
        assert pair["rejected"].count("\n") == pair["chosen"].count("\n")  # same shape, plausible
        assert extract_answer(pair["rejected"]) is not None


def test_wrong_solution_kinds():
    rng = random.Random(0)
    p = make_problem([47, 18], ["-"], 2)
    wrong = {extract_answer(wrong_solution(p, rng)) for _ in range(200)}
    assert wrong == {28, 30, 19, 65, 31}  # off by one (both ways), tens slip, wrong operation, no borrow
    p = make_problem([3, 0], ["+"], 1)    # no carry and + 0 == - 0: only slips remain
    assert {extract_answer(wrong_solution(p, rng)) for _ in range(100)} == {2, 4, 13}


def test_binary_feedback(mixed):
    rows = binary_feedback(mixed, seed=0, p_good=0.5)
    assert [r["label"] for r in rows] == [int(verify(p, r["completion"])) for p, r in zip(mixed, rows)]
    assert 0.35 < sum(r["label"] for r in rows) / len(rows) < 0.65
    assert all(r["label"] == 1 for r in binary_feedback(mixed[:50], seed=0, p_good=1.0))
    assert all(r["label"] == 0 for r in binary_feedback(mixed[:50], seed=0, p_good=0.0))
    with pytest.raises(ValueError):
        binary_feedback(mixed, p_good=1.5)


def test_scored_feedback(mixed):
    rows = scored_feedback(mixed, seed=0)
    for p, r in zip(mixed, rows):
        assert 0.0 <= r["score"] <= 1.0
        assert (r["score"] == 1.0) == verify(p, r["completion"])
    assert len({r["score"] for r in rows}) > 5  # graded, not binary


def test_score_golden():
    p = make_problem([4, 7, 3], ["+", "-"], 3)  # 4 + 7 = 11, 11 - 3 = 8
    assert score(p, p.solution) == 1.0
    assert score(p, "no answer here") == 0.0
    # answer 9: closeness 1 - 1/8, the first step right (1 of 2): 0.5 * 0.875 + 0.4 * 0.5
    assert score(p, "4 + 7 = 11\n11 - 3 = 9\nAnswer: 9") == pytest.approx(0.6375)
    # answer 10, no correct step: 0.5 * (1 - 2/8)
    assert score(p, "4 + 7 = 13\n13 - 3 = 10\nAnswer: 10") == pytest.approx(0.375)
    assert score(p, "Answer: 100") == 0.0
    assert score(make_problem([0, 0], ["+"], 1), "Answer: 1") == 0.0  # |a| = 0 uses max(1, |a|)


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("arith_tok") / "text.txt"
    lines = [render_chat(c).replace("\n", " ") for c in sft_examples(make_problems(2000, seed=0))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Tokenizer.train(path, vocab_size=320)


class ScriptedModel(torch.nn.Module):
    """Stands in for ElleciLM.generate: answers each prompt with a fixed completion text."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tok, self.answers, self.calls = tokenizer, answers, []

    def generate(self, input_ids, max_new_tokens=32, temperature=1.0, eos_token_id=None):
        assert not self.training and temperature == 0.0 and not torch.is_grad_enabled()
        eos = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        self.calls.append(len(input_ids))
        ids, _ = left_pad(input_ids, pad_token_id=eos)
        new = []
        for row in input_ids:
            question = self.tok.decode(row).split("user\n")[1].split("<|im_end|>")[0]
            new.append((self.tok.encode(self.answers[question]) + [eos])[:max_new_tokens])
        width = max(map(len, new))
        new = torch.tensor([r + [eos] * (width - len(r)) for r in new])
        return torch.cat([ids, new], dim=1)


def test_evaluate_oracle(tokenizer):
    problems = make_problems(40, seed=5, split="test")
    oracle = ScriptedModel(tokenizer, {p.question: p.solution for p in problems})
    oracle.train()
    report = evaluate(completer(oracle, tokenizer), problems, batch_size=16)
    assert report["accuracy"] == 1.0 and report["n"] == 40 and report["correct"] == 40
    assert report["accuracy_by_level"] == {lv: 1.0 for lv in LEVELS}
    assert oracle.training and oracle.calls == [16, 16, 8]  # mode restored; batched


def test_evaluate_wrong_and_per_level(tokenizer):
    problems = make_problems(30, seed=6)
    rng = random.Random(0)
    answers = {p.question: (p.solution if p.level == 1 else wrong_solution(p, rng)) for p in problems}
    report = evaluate(completer(ScriptedModel(tokenizer, answers), tokenizer), problems)
    assert report["accuracy_by_level"] == {1: 1.0, 2: 0.0, 3: 0.0}
    assert report["accuracy"] == pytest.approx(sum(p.level == 1 for p in problems) / 30)
    truncated = evaluate(completer(ScriptedModel(tokenizer, answers), tokenizer), problems, max_new_tokens=2)
    assert truncated["accuracy"] == 0.0  # the answer line is never reached
    with pytest.raises(ValueError):
        evaluate(completer(ScriptedModel(tokenizer, answers), tokenizer), [])


def test_evaluate_tiny_random_model(tokenizer):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny"))
    problems = make_problems(6, seed=0, split="test")
    report = evaluate(completer(model, tokenizer), problems, max_new_tokens=8, batch_size=4)
    assert 0.0 <= report["accuracy"] <= 1.0 and report["n"] == 6
    assert model.training  # a fresh module is in train mode, and stays so
    texts = generate_completions(completer(model, tokenizer), problems, max_new_tokens=8, batch_size=4)
    assert texts == generate_completions(completer(model, tokenizer), problems, max_new_tokens=8, batch_size=4)
    assert all(isinstance(t, str) for t in texts)
