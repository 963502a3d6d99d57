"""LM-backed agents for corpus distillation (`elleci.algos.curation.distill`): one prompted model plays each role.

    qg = LMQuestionGenerator(model, tok, k=8)        # k sampled questions per passage, open (wh-) ones kept
    answerer = LMAnswerer(model, tok)                # greedy answer from the retrieved context
    judge = LMJudge(model, tok)                      # every claim of the answer checked yes/no against the context
    agents = Agents(question_generator=qg, retriever=BM25Retriever(chunks), answerer=answerer, judge=judge)

Any object with ElleciLM's small generation/scoring interface works (`elleci.algos.sampling`), so each
agent can be a different checkpoint. Prompts are plain strings with `{passage}` / `{context}` /
`{question}` fields; `chat=True` renders them as one user turn with the chat template (an instruction-
tuned model), `chat=False` (the default) feeds them as raw text to a base model. The defaults are the
grounded-QA format (`elleci.tasks.grounded_qa`): "Passage: …\\nQuestion: …\\n<answer>", and the yes/no
check "Passage: …\\nQuestion: Is it true that <claim>? Please answer yes or no.\\n<yes|no>" of RLAIF-V
(`elleci.algos.alignment.rlaif_v`), whose divide-and-conquer claim check the judge reuses (m-KAILIN,
arXiv 2504.19565, does not publish its answer check).

Differences from the paper:
1. One prompted LM (or several: pass different models) instead of fine-tuned domain/general generators.
2. The judge verifies support only (every claim of the answer is asked back against the context, kept iff
   p_yes > threshold for all), not the question's relevance; the pairwise evaluator stays rule-based.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from elleci.algos.judging import claim_to_question, judge as yes_no_probs, labeler_prompt, split_claims
from elleci.algos.sampling import complete, prompt_ids, sample_responses

QUESTION_PROMPT = "Passage: {passage}\nQuestion:"
ANSWER_PROMPT = "Passage: {context}\nQuestion: {question}\n"
WH_WORDS = frozenset("who whom whose what which where when why how".split())


def first_question(text: str) -> str:
    """The first line of a generation, cut after its first "?"."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[: line.index("?") + 1] if "?" in line else line


def open_question(question: str) -> bool:
    """True for an open (wh-) question: starts with a wh-word and ends with "?" (yes/no questions fail)."""
    words = question.split()
    return bool(words) and words[0].lower() in WH_WORDS and question.endswith("?")


@dataclass
class LMQuestionGenerator:
    """QuestionGenerator: `k` sampled continuations of `prompt` per passage (one seeded batch,
    `sample_responses`), each cut to its first question, kept when `keep(question)`."""
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    k: int = 8
    prompt: str = QUESTION_PROMPT
    chat: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int = 16
    keep: Callable[[str], bool] = open_question
    batch_size: int = 64
    name: str = "lm-questions"

    def __call__(self, chunks: Sequence, *, seed: int) -> list[list[str]]:
        if not chunks:
            return []
        groups = sample_responses(self.model, self.tokenizer, [self.prompt.format(passage=c.text) for c in chunks],
                                  k=self.k, temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, seed=seed, batch_size=self.batch_size,
                                  chat=self.chat)
        return [[q for q in map(first_question, g) if self.keep(q)] for g in groups]


@dataclass
class LMAnswerer:
    """Answerer: the greedy continuation of `prompt` (first line) per (question, context)."""
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    prompt: str = ANSWER_PROMPT
    chat: bool = False
    max_new_tokens: int = 24
    batch_size: int = 64
    name: str = "lm-answerer"

    def __call__(self, questions: Sequence[str], contexts: Sequence[str]) -> list[str]:
        if not questions:
            return []
        texts = [self.prompt.format(context=c, question=q) for q, c in zip(questions, contexts)]
        outs = complete(self.model, self.tokenizer, prompt_ids(self.tokenizer, texts, chat=self.chat),
                        max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return [next((ln.strip() for ln in o.splitlines() if ln.strip()), "") for o in outs]


@dataclass
class LMJudge:
    """Judge: the answer's claims (`split_claims`), each asked back as "Is it true that <claim>?" about the
    retrieved context (`labeler_prompt` + `suffix`); keep iff p_yes > `threshold` for every claim, where
    (p_yes, p_no) are the model's next-token probabilities renormalised over the two answers."""
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    threshold: float = 0.5
    chat: bool = False
    suffix: str = "\n"
    batch_size: int = 32
    name: str = "lm-judge"

    def __post_init__(self):
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    def __call__(self, triples: Sequence) -> list[tuple[bool, str]]:
        claims = [split_claims(t.answer) for t in triples]
        prompts = [labeler_prompt(t.context, claim_to_question(c)) + self.suffix
                   for t, cs in zip(triples, claims) for c in cs]
        p_yes = (yes_no_probs(self.model, self.tokenizer, prompts, chat=self.chat, batch_size=self.batch_size)[:, 0]
                 .tolist() if prompts else [])
        it, out = iter(p_yes), []
        for cs in claims:
            ps = [next(it) for _ in cs]
            if not cs:
                out.append((False, "no claim to check"))
                continue
            worst = min(range(len(cs)), key=lambda i: ps[i])
            if ps[worst] > self.threshold:
                out.append((True, f"context supports every claim (min p_yes {ps[worst]:.2f})"))
            else:
                out.append((False, f"context does not support {cs[worst]!r} (p_yes {ps[worst]:.2f} <= "
                                   f"{self.threshold:g})"))
        return out
