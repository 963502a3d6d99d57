"""DiffCoT's data side: reasoning steps as text, step candidates from the policy, and the step verifiers.

    steps = split_steps("4 + 7 = 11\\n11 - 3 = 8\\nAnswer: 8")      # ["4 + 7 = 11", "11 - 3 = 8", "Answer: 8"]
    ctx = render_context(steps[:1], ["11 - 3 = 9"])               # "4 + 7 = 11\\n<revise>\\n11 - 3 = 9\\n</revise>\\n"
    cands = propose_steps(model, tok, prompts, prefixes, m=4, seed=0)     # [N][m] next steps given a clean prefix
    q = [[arithmetic_step_score(p.question, pre, s) for s in cs] for p, pre, cs in zip(problems, prefixes, cands)]
    q = mc_step_scores(model_rollouts(model, tok), verify, prompts, prefixes, cands, rollouts=4)   # Math-Shepherd

Step format (one step a line; `elleci.tasks.arithmetic` solutions already are: "x op y = r" lines, then
"Answer: N"). The assistant text DiffCoT conditions on is the frozen clean prefix, one step a line, then
the window's draft steps between marker lines, which the model may rewrite:

    <clean step 1>\\n ... <clean step c>\\n<revise>\\n<draft 1>\\n ... <draft d>\\n</revise>\\n

and the model writes the d revised drafts plus one new step, one a line (`render_target`: a final
"Answer:" line is followed by <|im_end|>, any other by "\\n"). No drafts, no marker lines: with a window
of one step the format is exactly the plain worked solution that SFT trains.

Verifiers (spec §7.5), each giving a score in [0, 1] per candidate step given its clean prefix:
    mc_step_scores         generic, Math-Shepherd's soft label: the fraction of R sampled completions from
                           (prefix, step) whose final answer is right; an "Answer:" step is scored directly.
    arithmetic_step_score  a cheap, exact process verifier for the arithmetic task's format: the fraction
                           of the step's checks that pass (left operand chains from the previous result,
                           operator and right operand are the question's next ones, the written arithmetic
                           is right; an answer step: it repeats the last result). 1.0 iff the step is the
                           reference step; graded otherwise, which gives the rank a spectrum.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from elleci.algos.sampling import complete, prompt_ids

REVISE_OPEN, REVISE_CLOSE = "<revise>", "</revise>"
_ANSWER = re.compile(r"^\s*Answer\s*:\s*([+-]?\d+)\s*$")
_EQUATION = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_QUESTION = re.compile(r"^\s*(\d+(?:\s*[+-]\s*\d+)+)\s*=\s*\?\s*$")


# ----------------------------------------------------------------------------- step format

def split_steps(text: str) -> list[str]:
    """Segment a worked solution into steps: one per non-empty line (stripped); marker lines dropped."""
    return [s for s in (line.strip() for line in text.split("\n")) if s and s not in (REVISE_OPEN, REVISE_CLOSE)]


def is_answer_step(step: str) -> bool:
    """True for a final-answer line ("Answer: <int>")."""
    return _ANSWER.match(step) is not None


def _lines(steps: Sequence[str]) -> str:
    for s in steps:
        if "\n" in s or not s.strip():
            raise ValueError(f"a step is one non-empty line, got {s!r}")
    return "".join(s + "\n" for s in steps)


def render_context(clean: Sequence[str], drafts: Sequence[str] = ()) -> str:
    """Assistant text so far: the clean prefix, then the drafts between <revise> marker lines (if any)."""
    text = _lines(clean)
    return text + (f"{REVISE_OPEN}\n{_lines(drafts)}{REVISE_CLOSE}\n" if drafts else "")


def render_target(steps: Sequence[str]) -> str:
    """What the model writes: revised drafts + the new step, one a line; after a final "Answer:" line the
    turn ends (the encoder appends <|im_end|>), otherwise a newline leads to the next step."""
    if not steps:
        raise ValueError("a target needs at least one step")
    text = _lines(steps)
    return text[:-1] if is_answer_step(steps[-1]) else text


def parse_output(text: str, n: int) -> list[str]:
    """The first `n` steps of a generation, cut after the first answer step."""
    out = []
    for s in split_steps(text)[:n]:
        out.append(s)
        if is_answer_step(s):
            break
    return out


def encode_with_context(tokenizer, prompt, context: str, target: str) -> tuple[list[int], list[int]]:
    """(ids, labels): chat prompt + generation prompt + context text (unscored) + target (scored), and
    <|im_end|> when the target ends in an answer step. Steps end in a newline, which is a token boundary."""
    head = prompt_ids(tokenizer, [prompt])[0] + tokenizer.encode(context)
    body = tokenizer.encode(target)
    if not target.endswith("\n"):
        body = body + [tokenizer.im_end_id]
    return head + body, [-100] * len(head) + body


# ----------------------------------------------------------------------------- candidates from the policy

def continuations(model, tokenizer, prompts: Sequence, contexts: Sequence[str], n: int = 1, *,
                  temperature: float = 1.0, max_new_tokens: int = 12, seed: int = 0,
                  batch_size: int = 64) -> list[list[str]]:
    """n continuations of each (prompt, assistant context) → [N][n] texts (temperature 0: greedy, n = 1)."""
    if len(prompts) != len(contexts):
        raise ValueError(f"{len(prompts)} prompts but {len(contexts)} contexts")
    if n < 1 or (temperature <= 0 and n != 1):
        raise ValueError(f"n must be >= 1 (and 1 for greedy decoding), got n={n}, temperature={temperature}")
    heads = [p + tokenizer.encode(c) for p, c in zip(prompt_ids(tokenizer, prompts), contexts)]
    rows = [h for h in heads for _ in range(n)]                          # prompt-major: rows i*n .. i*n+n-1
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed) if temperature > 0 else None
    flat = complete(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=max(temperature, 0.0),
                    generator=gen, batch_size=batch_size)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def propose_steps(model, tokenizer, prompts: Sequence, prefixes: Sequence[Sequence[str]], m: int, *,
                  temperature: float = 1.0, max_new_tokens: int = 12, seed: int = 0, batch_size: int = 256
                  ) -> list[list[str]]:
    """M alternative next steps per (prompt, clean prefix), sampled from the policy in one batch → [N][m]
    (the first line of each sample; "" when it wrote nothing)."""
    texts = continuations(model, tokenizer, prompts, [render_context(p) for p in prefixes], m,
                          temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    return [[(split_steps(t) or [""])[0] for t in row] for row in texts]


def model_rollouts(model, tokenizer, *, temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
                   batch_size: int = 256) -> Callable[[Sequence, Sequence[str], int], list[list[str]]]:
    """rollout_fn(prompts, contexts, n) → [N][n] sampled completions, for `mc_step_scores`."""
    def rollout_fn(prompts, contexts, n):
        return continuations(model, tokenizer, prompts, contexts, n, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    return rollout_fn


# ----------------------------------------------------------------------------- verifiers

def mc_step_scores(rollout_fn: Callable, verify_fn: Callable[[int, str], bool], prompts: Sequence,
                   prefixes: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]], rollouts: int = 4
                   ) -> list[list[float]]:
    """Math-Shepherd soft labels: q(ŝ) = (1/R) Σ_r 1[verify(prefix, ŝ, completion_r)] → [N][M].

    verify_fn(i, solution_text) judges problem i's full solution text; an answer step (or an empty
    one) is judged as it stands, without rollouts. All rollouts go to `rollout_fn` in one call."""
    if rollouts < 1:
        raise ValueError(f"rollouts must be >= 1, got {rollouts}")
    if not len(prompts) == len(prefixes) == len(candidates):
        raise ValueError(f"{len(prompts)} prompts, {len(prefixes)} prefixes, {len(candidates)} candidate lists")
    scores = [[0.0] * len(c) for c in candidates]
    todo = []                                                            # (i, m) rolled out
    for i, (pre, cands) in enumerate(zip(prefixes, candidates)):
        for m, s in enumerate(cands):
            if not s.strip() or is_answer_step(s):
                scores[i][m] = float(bool(s.strip()) and verify_fn(i, _lines([*pre, s])))
            else:
                todo.append((i, m))
    if todo:
        ctx = [render_context([*prefixes[i], candidates[i][m]]) for i, m in todo]
        outs = rollout_fn([prompts[i] for i, _ in todo], ctx, rollouts)   # [len(todo)][R]
        for (i, m), c, ys in zip(todo, ctx, outs):
            scores[i][m] = sum(bool(verify_fn(i, c + y)) for y in ys) / len(ys)
    return scores


def parse_question(question: str) -> tuple[list[int], list[str]]:
    """"4 + 7 - 3 = ?" → ([4, 7, 3], ["+", "-"])."""
    m = _QUESTION.match(question)
    if m is None:
        raise ValueError(f"not an arithmetic question of the form 'a op b ... = ?': {question!r}")
    tokens = re.findall(r"\d+|[+-]", m.group(1))
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def arithmetic_step_score(question: str, prefix: Sequence[str], step: str) -> float:
    """Process score of `step` after the clean `prefix` (a list of steps) for an arithmetic question.

    Equation step j (j <= #operators): mean of four checks on "x op y = r": x is the previous result (the
    first number for j = 1), op and y are the question's j-th operator and next number, r = x op y as
    written. Answer step (j = #operators + 1): 1 iff it states the previous result. Anything else
    (unparseable, an equation where the answer is due or the reverse, a step past the answer): 0."""
    nums, ops = parse_question(question)
    value = nums[0]
    for i, s in enumerate(prefix):                                       # the running value of the prefix
        m = _EQUATION.match(s)
        if m is None or i >= len(ops):
            raise ValueError(f"prefix step {i + 1} {s!r} is not an equation of this question")
        value = int(m.group(4))
    j = len(prefix)
    if j == len(ops):
        a = _ANSWER.match(step)
        return float(a is not None and int(a.group(1)) == value)
    m = _EQUATION.match(step)
    if j > len(ops) or m is None:
        return 0.0
    x, op, y, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    checks = (x == value, op == ops[j], y == nums[j + 1], r == (x + y if op == "+" else x - y))
    return sum(checks) / len(checks)
