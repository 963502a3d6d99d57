"""LM judging shared by RLAIF, RLAIF-V and corpus distillation: split an answer into claims, turn a claim into a
yes/no question, and read a judge's yes / no (/ unknown) probabilities from its next-token distribution.

    claims = split_claims(answer)                                   # or lm_divider(model, tok)(answer, question)
    questions = [claim_to_question(c) for c in claims]             # "Is it true that <claim>?"
    probs = verify_claims(judge_model, tok, passage, questions)     # [C, 2] (p_yes, p_no)
    accepted = accepted_claims(probs)                               # p_yes > p_no per claim

The judge is any model with ElleciLM's small interface (`elleci.algos.sampling`): the policy itself or
another checkpoint. Prompts follow RLAIF-V (Yu et al., arXiv 2405.17220); see `elleci.algos.alignment.rlaif_v`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from elleci.algos.sampling import choice_probs, complete, next_token_logprobs, prompt_ids

CLAIM_PROMPT = (
    "You are an expert in extracting facts from the given question-answer pair for a passage. Your task is to "
    "extract and rewrite the facts mentioned in the question-answer pair into self-contained sentences. "
    "Exclude opinions or subjective statements.\n\nYou should present your result in the following format:\n"
    "### Facts:\n- {{Extracted fact 1}}\n- {{Extracted fact 2}}\n- ...\n\n"
    "### Question-answer pair:\nQuestion: {question}\nAnswer: {answer}")
QUESTION_PROMPT = (
    "You are an expert at modifying a given declarative sentence into a general question sentence. "
    "Do not change tenses or add extra content. If the sentence contains not, no or words with a negative "
    "meaning, keep them in the question.\n\n### Declarative sentence:\n{claim}\n\n### General question:")
LABELER_PROMPT = "Passage: {passage}\nQuestion: {question} Please answer yes or no."
LABELER_PROMPT_UNKNOWN = "Passage: {passage}\nQuestion: {question} Please answer yes, no or unknown."
YES = ("yes", " yes", "Yes", " Yes")
NO = ("no", " no", "No", " No")
UNKNOWN = ("unknown", " unknown", "Unknown", " Unknown")
UNDECIDABLE = ("no", "filter")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.*\S)\s*$")
_WORD = re.compile(r"\w")




# ----------------------------------------------------------------------------------------- divide

def split_claims(text: str, question: str | None = None) -> list[str]:
    """One claim per sentence (split after . ! ? and at newlines; bullet markers and fragments without a
    letter or digit dropped). `question` is ignored: the signature is the `divider(answer, question)` one."""
    out = []
    for s in _SENTENCE_END.split(text):
        m = _BULLET.match(s)
        s = (m.group(1) if m else s).strip()
        if _WORD.search(s):
            out.append(s)
    return out


def parse_bullets(text: str) -> list[str]:
    """The items of a "- ..." / "* ..." / "1. ..." list (other lines, e.g. "### Facts:", are skipped)."""
    return [m.group(1) for m in map(_BULLET.match, text.splitlines()) if m]


def extract_claims(model, tokenizer, question: str, answer: str, *, prompt: str = CLAIM_PROMPT,
                   max_words: int = 300, max_new_tokens: int = 128, chat: bool = True) -> list[str]:
    """Atomic, self-contained claims of `answer` written by an LM from a fixed prompt (greedy), parsed
    from its bullet list; `split_claims(answer)` when the output has no bullet."""
    content = " ".join(prompt.format(question=question, answer=answer).split(" ")[:max_words])
    out = complete(model, tokenizer, prompt_ids(tokenizer, [content], chat=chat), max_new_tokens=max_new_tokens)
    return parse_bullets(out[0]) or split_claims(answer)


def lm_divider(model, tokenizer, **kw) -> Callable[[str, str], list[str]]:
    """A `divider(answer, question)` that calls `extract_claims(model, tokenizer, question, answer, **kw)`."""
    return lambda answer, question=None: extract_claims(model, tokenizer, question or "", answer, **kw)


def claim_to_question(claim: str) -> str:
    """The deterministic converter: "Anna lives in Milan." -> "Is it true that Anna lives in Milan?"."""
    core = claim.strip().rstrip(".!?").strip()
    if not core:
        raise ValueError("empty claim")
    return f"Is it true that {core}?"


def question_by_lm(model, tokenizer, claims: Sequence[str], *, prompt: str = QUESTION_PROMPT,
                   max_new_tokens: int = 48, chat: bool = True) -> list[str]:
    """A yes/no question per claim written by an LM (greedy, fixed prompt that keeps negations); the
    template `claim_to_question` wherever the output's first line is not a question."""
    if not claims:
        return []
    outs = complete(model, tokenizer, prompt_ids(tokenizer, [prompt.format(claim=c) for c in claims], chat=chat),
                    max_new_tokens=max_new_tokens)
    questions = []
    for claim, out in zip(claims, outs):
        line = next((ln.strip() for ln in out.splitlines() if ln.strip()), "")
        m = _BULLET.match(line)
        line = m.group(1) if m else line
        questions.append(line if line.endswith("?") else claim_to_question(claim))
    return questions


# ---------------------------------------------------------------------------------------- conquer

def labeler_prompt(passage: str, question: str, *, undecidable: str = "no") -> str:
    """The labeler's user turn: "Passage: {passage}\\nQuestion: {question} Please answer yes or no."."""
    _check_undecidable(undecidable)
    template = LABELER_PROMPT if undecidable == "no" else LABELER_PROMPT_UNKNOWN
    return template.format(passage=passage, question=question)


def _check_undecidable(undecidable: str) -> None:
    if undecidable not in UNDECIDABLE:
        raise ValueError(f"undecidable={undecidable!r}; choose one of {UNDECIDABLE}")


def answer_token_ids(tokenizer, choices: Sequence[Sequence[str]]) -> list[list[int]]:
    """The token ids whose probabilities add up to each answer: every variant counts by its first token
    (its only token when the tokenizer keeps it whole: then this is `single_token_ids`), and a first
    token shared by two answers (e.g. a lone "▁") counts for neither. Small vocabularies split "yes"
    into "y" + "es": the labeler's first answer token is then "y", which this reads."""
    firsts = [[tokenizer.encode(v)[0] for v in variants if tokenizer.encode(v)] for variants in choices]
    counts = {}
    for ids in firsts:
        for t in set(ids):
            counts[t] = counts.get(t, 0) + 1
    out = [list(dict.fromkeys(t for t in ids if counts[t] == 1)) for ids in firsts]
    for variants, ids in zip(choices, out):
        if not ids:
            raise ValueError(f"no first token distinguishes {list(variants)!r} from the other answers")
    return out


def judge(labeler, tokenizer, prompts: Sequence[str], *, chat: bool = True, undecidable: str = "no",
          batch_size: int = 32) -> torch.Tensor:
    """[N, 2] (p_yes, p_no), or [N, 3] (p_yes, p_no, p_unknown) with undecidable="filter", read from the
    labeler's next-token distribution after each prompt and renormalised over the answer tokens."""
    _check_undecidable(undecidable)
    choices = answer_token_ids(tokenizer, [YES, NO] + ([UNKNOWN] if undecidable == "filter" else []))
    if not prompts:
        return torch.zeros(0, len(choices))
    logp = next_token_logprobs(labeler, prompt_ids(tokenizer, prompts, chat=chat), batch_size=batch_size)
    return choice_probs(logp, choices)


def verify_claims(labeler, tokenizer, passage: str, questions: Sequence[str], *, chat: bool = True,
                  undecidable: str = "no", batch_size: int = 32) -> torch.Tensor:
    """(p_yes, p_no[, p_unknown]) per yes/no question about `passage` -> [C, 2] (or [C, 3])."""
    prompts = [labeler_prompt(passage, q, undecidable=undecidable) for q in questions]
    return judge(labeler, tokenizer, prompts, chat=chat, undecidable=undecidable, batch_size=batch_size)


def accepted_claims(probs: torch.Tensor) -> list[bool | None]:
    """Per claim: True iff p_yes > p_no; with a third column, None (left out) when p_unknown is the largest."""
    out = []
    for row in probs.tolist():
        if len(row) == 3 and row[2] > max(row[0], row[1]):
            out.append(None)
        else:
            out.append(row[0] > row[1])
    return out
