"""The nouns of corpus distillation (`elleci.algos.curation.distill`): chunks, triples, verdicts and the
agent protocols, shared by the loop and its rule-based agents (`distill_rules`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Chunk:
    """A passage of a document: id "<doc_id>#<index>"."""
    id: str
    doc_id: str
    text: str


@dataclass(frozen=True)
class Triple:
    """What the judge sees: a question, its retrieved context and the answer, with the source chunk."""
    question: str
    context: str
    answer: str
    chunk: Chunk
    context_ids: tuple[str, ...] = ()


Verdict = tuple[bool, str]


class QuestionGenerator(Protocol):
    def __call__(self, chunks: Sequence[Chunk], *, seed: int) -> list[list[str]]: ...   # candidates per chunk


class Retriever(Protocol):
    def __call__(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]: ...  # (chunk id, score)


class Preference(Protocol):
    def __call__(self, a: tuple[str, str], b: tuple[str, str]) -> int: ...  # (q, ctx) pairs → +1 a, −1 b, 0 tie


class Answerer(Protocol):
    def __call__(self, questions: Sequence[str], contexts: Sequence[str]) -> list[str]: ...


class Judge(Protocol):
    def __call__(self, triples: Sequence[Triple]) -> list[Verdict]: ...
