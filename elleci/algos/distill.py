"""Multi-agent corpus distillation: question–context–answer triples from a folder of documents (m-KAILIN).

m-KAILIN (Xiao et al., "Knowledge-Driven Agentic Scientific Corpus Distillation Framework for Biomedical
LLM Training", https://arxiv.org/abs/2504.19565) turns unlabelled documents into training triples with
a chain of agents:

    Document → QGen (candidate questions) → Retrieve (top-k context) → Evaluate (pairwise preference
    between (question, context) candidates) → Answer → record {question, context, answer, provenance}

Objective in one line: keep the triples (q, c, a) with q asked of a document, c = top-k(retrieve(q)),
a = answer(q, c), that the evaluator prefers and the judge accepts.

    from elleci.algos.distill_rules import OverlapJudge, cloze_questions, overlap_answerer
    from elleci.algos.retrieval import BM25Retriever
    chunks = load_chunks("docs/")                                         # .txt / .md, paragraphs → passages
    agents = Agents(question_generator=cloze_questions, retriever=BM25Retriever(chunks),
                    answerer=overlap_answerer, judge=OverlapJudge())
    stats = distill(chunks, "out/qca", agents, k=2, batch_size=8, seed=0)  # resumable; out/qca/records.jsonl

Every agent is a replaceable callable over a batch (`QuestionGenerator`, `Retriever`, `Preference`,
`Answerer`, `Judge`); the rule-based ones here are baselines and stubs, `elleci.algos.distill_lm` has
LM-backed ones (any ElleciLM + tokenizer, batched generation via `elleci.algos.sampling`) and
`elleci.algos.retrieval` the retrievers. An agent's name (its `name` attribute, else `__name__`) goes
into every record.

Glossary: chunk = a passage with id "<doc_id>#<i>"; candidate = (question, retrieved context) before
selection; terms(x) = the stemmed words of x minus stop words (the ontology terms, MeSH's stand-in);
verdict = (keep, reason).

Per batch of `batch_size` unprocessed chunks (in corpus order):
    1 questions   QG(chunks, seed) → candidates per chunk; blank ones dropped, duplicates (normalised
                  text) within a chunk dropped
    2 retrieve    top-k chunk ids and scores per candidate; context = their texts joined, best first
    3 evaluate    round robin of the pairwise evaluator over a chunk's candidates; the
                  `questions_per_chunk` with most wins (ties: generation order) go on
    4 answer      answerer(questions, contexts)
    5 judge       empty answer → rejected ("empty answer"); else judge(triples) → (keep, reason);
                  judge=None keeps all ("no judge"); a kept triple whose normalised question was kept
                  before → rejected ("duplicate of a kept question")
    6 write       every triple, kept or not, as one JSONL record appended (fsynced) to records.jsonl,
                  then progress.json (chunks done, byte length of the valid JSONL) replaced atomically

Resume: chunks named in progress.json are skipped and the JSONL is cut back to the recorded length (a
batch torn by a crash is redone whole). A batch's sampling seed depends on (seed, its chunk ids) only, so
an interrupted and resumed run writes the same bytes as an uninterrupted one.

Differences from the paper:
1. Documents are any .txt/.md files cut into passages (paragraphs, at most `max_words` words), not PubMed.
2. The question generator is any callable (prompted LM or rule); nothing is fine-tuned on BioASQ here.
3. The evaluator is the cold-start rule itself (term overlap of question and context, `term_preference`)
   or any pairwise callable; no LLM evaluator is trained on its labels and there is no DPO feedback to
   the question generator.
4. Selection keeps the top `questions_per_chunk` of a round robin, not one winner of each pair.
5. A final judge (keep / reject with a reason) and dedup on normalised question text are added.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .._io import read_text_file, write_json_atomic
from .distill_rules import OverlapJudge, keep_all, normalise_question, overlap_answerer, term_preference, terms

SUFFIXES = (".txt", ".md")
RECORDS, PROGRESS = "records.jsonl", "progress.json"
EMPTY, DUPLICATE = "empty answer", "duplicate of a kept question"   # the loop's own rejection reasons


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


def agent_name(agent) -> str:
    """An agent's name for provenance: its `name` attribute, else `__name__`, else its class name."""
    if agent is None:
        return "none"
    return str(getattr(agent, "name", None) or getattr(agent, "__name__", None) or type(agent).__name__)


# ----------------------------------------------------------------------------------- documents

_HEADING = re.compile(r"^\s*#{1,6}\s")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def read_documents(folder, suffixes: Sequence[str] = SUFFIXES) -> list[tuple[str, str]]:
    """(doc_id, text) of every file under `folder` with one of `suffixes`, sorted by doc_id (the path
    relative to `folder`, with "/")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"document folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    return [(p.relative_to(folder).as_posix(), read_text_file(p)) for p in paths]


def chunk_text(text: str, max_words: int = 80) -> list[str]:
    """Passages of `text`: paragraphs (split at blank lines; markdown heading lines dropped), whitespace
    collapsed; a paragraph longer than `max_words` words is packed sentence by sentence into passages of
    at most `max_words` words (a longer sentence stands alone)."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if not _HEADING.match(ln)]
        para = " ".join(" ".join(lines).split())
        if not para:
            continue
        current: list[str] = []
        for sentence in _SENTENCE_END.split(para):
            if current and len(" ".join(current + [sentence]).split()) > max_words:
                out.append(" ".join(current))
                current = []
            current.append(sentence)
        out.append(" ".join(current))
    return out


def chunk_documents(documents: Sequence[tuple[str, str]], max_words: int = 80) -> list[Chunk]:
    """Chunks of every (doc_id, text), in order, with ids "<doc_id>#<i>"."""
    return [Chunk(f"{doc_id}#{i}", doc_id, passage)
            for doc_id, text in documents for i, passage in enumerate(chunk_text(text, max_words))]


def load_chunks(folder, max_words: int = 80, suffixes: Sequence[str] = SUFFIXES) -> list[Chunk]:
    """`chunk_documents(read_documents(folder))`."""
    return chunk_documents(read_documents(folder, suffixes), max_words)


@dataclass
class Agents:
    """The replaceable agents of one distillation run."""
    question_generator: QuestionGenerator
    retriever: Retriever
    answerer: Answerer = overlap_answerer
    judge: Judge | None = field(default_factory=OverlapJudge)
    evaluator: Preference = term_preference

    def names(self) -> dict[str, str]:
        return {k: agent_name(getattr(self, k))
                for k in ("question_generator", "retriever", "evaluator", "answerer", "judge")}




# ------------------------------------------------------------------------------------ the loop

def round_robin(candidates: Sequence[tuple[str, str]], prefer: Preference, n: int | None) -> list[tuple[int, int]]:
    """(index, wins) of the `n` candidates (all when None) with most pairwise wins, best first; ties by index."""
    wins = [0] * len(candidates)
    for i in range(len(candidates)):
        for j in range(i + 1, len(candidates)):
            p = prefer(candidates[i], candidates[j])
            if p > 0:
                wins[i] += 1
            elif p < 0:
                wins[j] += 1
    order = sorted(range(len(candidates)), key=lambda i: (-wins[i], i))
    return [(i, wins[i]) for i in (order if n is None else order[:n])]


def batch_seed(seed: int, chunk_ids: Sequence[str]) -> int:
    """The sampling seed of a batch: a hash of (seed, its chunk ids), so a resumed run draws the same."""
    digest = hashlib.sha256(("\n".join([str(seed), *chunk_ids])).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def _questions(chunk: Chunk, raw) -> list[tuple[int, str]]:
    """(position, question) of a chunk's candidates: whitespace collapsed, blank and repeated ones dropped."""
    seen, out = set(), []
    for j, q in enumerate(raw):
        q = " ".join(str(q).split())
        key = normalise_question(q)
        if key and key not in seen:
            seen.add(key)
            out.append((j, q))
    return out


def _check_len(what: str, got, want: int) -> None:
    if len(got) != want:
        raise ValueError(f"{what} returned {len(got)} results for {want} inputs")


def _verdicts(judge: Judge | None, triples: list[Triple]) -> list[Verdict]:
    """Empty answers are rejected here; the judge (keep_all when None) rules on the others."""
    out: list[Verdict | None] = [(False, EMPTY) if not t.answer.strip() else None for t in triples]
    todo = [i for i, v in enumerate(out) if v is None]
    if todo:
        ruled = (judge or keep_all)([triples[i] for i in todo])
        _check_len("judge", ruled, len(todo))
        for i, (keep, reason) in zip(todo, ruled):
            if not keep and not str(reason).strip():
                raise ValueError(f"judge {agent_name(judge)} rejected a triple without a reason")
            out[i] = (bool(keep), str(reason))
    return out


def process_batch(batch: Sequence[Chunk], by_id: dict[str, Chunk], agents: Agents, *, k: int,
                  questions_per_chunk: int | None, seed: int, kept_questions: set[str]) -> list[dict]:
    """Steps 1-5 of the module docstring for one batch → its records (kept_questions is updated)."""
    raw = agents.question_generator(batch, seed=seed)
    _check_len("question_generator", raw, len(batch))
    cands = [(c, j, q) for c, qs in zip(batch, raw) for j, q in _questions(c, qs)]
    hits = agents.retriever([q for _, _, q in cands], k) if cands else []
    _check_len("retriever", hits, len(cands))
    for (_, _, q), h in zip(cands, hits):
        if not h or any(i not in by_id for i, _ in h):
            raise ValueError(f"retriever gave no context or unknown chunk ids for {q!r}: {h!r}")
    contexts = [" ".join(by_id[i].text for i, _ in h) for h in hits]
    chosen = []                                                       # (candidate index, wins)
    for c in batch:
        idx = [n for n, (cc, _, _) in enumerate(cands) if cc is c]
        pairs = [(cands[n][2], contexts[n]) for n in idx]
        chosen += [(idx[i], w) for i, w in round_robin(pairs, agents.evaluator, questions_per_chunk)]
    chosen.sort()                                                     # records in generation order
    answers = agents.answerer([cands[n][2] for n, _ in chosen], [contexts[n] for n, _ in chosen]) if chosen else []
    _check_len("answerer", answers, len(chosen))
    triples = [Triple(cands[n][2], contexts[n], " ".join(str(a).split()), cands[n][0],
                      tuple(i for i, _ in hits[n])) for (n, _), a in zip(chosen, answers)]
    names, records = agents.names(), []
    for (n, wins), t, (keep, reason) in zip(chosen, triples, _verdicts(agents.judge, triples)):
        key = normalise_question(t.question)
        if keep and key in kept_questions:
            keep, reason = False, DUPLICATE
        elif keep:
            kept_questions.add(key)
        records.append({"id": f"{t.chunk.id}/q{cands[n][1]}", "doc_id": t.chunk.doc_id, "chunk_id": t.chunk.id,
                        "question": t.question, "context_ids": list(t.context_ids),
                        "context_scores": [round(s, 6) for _, s in hits[n]], "context": t.context,
                        "answer": t.answer, "source_retrieved": t.chunk.id in t.context_ids,
                        "evaluator_wins": wins, "terms": sorted(terms(t.question)), "keep": keep, "reason": reason,
                        "agents": names, "seed": seed})
    return records


def _progress(out: Path, signature: dict) -> dict:
    path = out / PROGRESS
    if not path.is_file():
        return {"signature": signature, "chunks_done": [], "bytes": 0, "records": 0, "kept": 0, "batches": 0}
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress["signature"] != signature:
        raise ValueError(f"{out} holds a run with other settings: {progress['signature']} != {signature}; "
                         "use another out_dir or the same agents and settings")
    return progress


def read_records(out_dir) -> list[dict]:
    """The records of a run: the JSONL up to the length progress.json vouches for (all of it if none)."""
    out = Path(out_dir)
    path = out / RECORDS
    if not path.is_file():
        return []
    data = path.read_bytes()
    if (out / PROGRESS).is_file():
        data = data[: json.loads((out / PROGRESS).read_text(encoding="utf-8"))["bytes"]]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def distill(chunks: Sequence[Chunk], out_dir, agents: Agents, *, k: int = 2, questions_per_chunk: int | None = None,
            batch_size: int = 8, seed: int = 0, max_batches: int | None = None, print_fn=print) -> dict:
    """Distil QCA triples from `chunks` into out_dir/records.jsonl, resuming a run found there (same
    agents and settings, else ValueError). `max_batches` stops early (a budget). Returns
    {"chunks", "skipped", "processed", "batches", "records", "kept"} (records/kept: the whole file)."""
    if k < 1 or batch_size < 1 or (questions_per_chunk is not None and questions_per_chunk < 1):
        raise ValueError(f"k, batch_size and questions_per_chunk must be >= 1, got {k}, {batch_size}, "
                         f"{questions_per_chunk}")
    by_id = {c.id: c for c in chunks}
    if len(by_id) != len(chunks):
        raise ValueError("chunk ids must be unique")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    signature = {"agents": agents.names(), "k": k, "questions_per_chunk": questions_per_chunk,
                 "batch_size": batch_size, "seed": seed}
    progress, path = _progress(out, signature), out / RECORDS
    size = path.stat().st_size if path.is_file() else 0
    if size < progress["bytes"]:
        raise ValueError(f"{path} is shorter ({size} bytes) than progress.json records ({progress['bytes']})")
    with open(path, "ab") as f:                                       # cut a torn batch off
        f.truncate(progress["bytes"])
    kept_questions = {normalise_question(r["question"]) for r in read_records(out) if r["keep"]}
    done = set(progress["chunks_done"])
    todo = [c for c in chunks if c.id not in done]
    stats = {"chunks": len(chunks), "skipped": len(chunks) - len(todo), "processed": 0, "batches": 0}
    for start in range(0, len(todo), batch_size):
        if max_batches is not None and stats["batches"] >= max_batches:
            break
        batch = todo[start:start + batch_size]
        records = process_batch(batch, by_id, agents, k=k, questions_per_chunk=questions_per_chunk,
                                seed=batch_seed(seed, [c.id for c in batch]), kept_questions=kept_questions)
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        progress = {**progress, "chunks_done": progress["chunks_done"] + [c.id for c in batch],
                    "bytes": progress["bytes"] + len(data), "records": progress["records"] + len(records),
                    "kept": progress["kept"] + sum(r["keep"] for r in records), "batches": progress["batches"] + 1}
        write_json_atomic(out / PROGRESS, progress)
        stats["processed"] += len(batch)
        stats["batches"] += 1
        print_fn(f"distill batch {progress['batches']} | chunks {len(progress['chunks_done'])}/{len(chunks)} | "
                 f"records {progress['records']} | kept {progress['kept']}")
    return {**stats, "records": progress["records"], "kept": progress["kept"]}
