"""Verifiable rewards of the arithmetic testbed for GRPO (`elleci.algos.reasoning.grpo.run_grpo`'s
`reward_fn` and `step_fn`): correctness of the long-CoT answer section, format, and per-step process rewards.

    run_grpo(model, tok, problems, cfg, reward_fn=arithmetic_reward, step_fn=arithmetic_steps,
             render=arithmetic.prompt_messages)
"""
from __future__ import annotations

import re

from elleci.algos.reasoning.long_cot import answer_section, arithmetic_trace, parse_long_cot
from elleci.tasks import arithmetic

_STEP_RE = re.compile(r"^[ \t]*(\d+)[ \t]*([+-])[ \t]*(\d+)[ \t]*=[ \t]*(-?\d+)[ \t]*$", re.M)


def arithmetic_reward(problem, text: str, stopped: bool = True) -> tuple[bool, bool]:
    """(correct, well formatted) for a response decoded with its special tokens (without the final stop):
    correct = `arithmetic.verify` on the answer section; formatted = `parse_long_cot` matches, the answer
    line is "Answer: <int>" and the response ended by itself (`stopped`)."""
    parsed = parse_long_cot(text)
    fmt = stopped and parsed is not None and re.fullmatch(r"Answer: [+-]?\d+", parsed[1]) is not None
    return arithmetic.verify(problem, answer_section(text)), fmt


def arithmetic_steps(problem, text: str, correct: bool) -> list[tuple[int, float]]:
    """Process rewards: (character end, reward) per step: each "x op y = r" line of the thinking scores 1
    if it is a line of the reference solution, else 0; the last step (ending at len(text)) is the answer
    (`run_grpo` ends it at the completion's last token, the stop id included)."""
    reference = {m.groups() for m in _STEP_RE.finditer(arithmetic_trace(problem))}
    think = text.rsplit("<|im_start|>answer", 1)[0]
    steps = [(m.end(), float(m.groups() in reference)) for m in _STEP_RE.finditer(think)]
    return steps + [(len(text), float(correct))]
