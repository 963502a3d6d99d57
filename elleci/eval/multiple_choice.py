"""Multiple-choice accuracy on a local JSONL file, `acc` and `acc_norm` as lm-evaluation-harness reports them.

    records = read_multiple_choice("configs/eval/data/mc_it.jsonl")
    metrics, samples = evaluate_multiple_choice(model, tok, records, template="Domanda: {question}\\nRisposta:")

A record: {"question": str, "choices": [str, ...] (at least 2), "answer": 0-based index or the right choice's text}.
Each choice c is scored as the continuation target_delimiter + c of the prompt template.format(question=...)
(with chat=True: the prompt is one user turn of the chat template plus the generation prompt, and the
continuation is c alone). With ll_c = log p(continuation_c | prompt):

    acc       = mean over questions of 1[argmax_c ll_c = gold]
    acc_norm  = mean over questions of 1[argmax_c ll_c / len(c) = gold]     len(c) in characters
    acc_stderr, acc_norm_stderr = sample standard deviation / √n           (lm-eval's `mean_stderr`)

len(c) counts the characters of the choice text without the delimiter, exactly as lm-eval's
`ConfigurableTask.process_results` does (`completion_len = len(choice)`; its `acc_bytes` divides by UTF-8
bytes instead, which differs on accented Italian). Ties go to the first choice (numpy argmax).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..data import read_jsonl
from .scoring import encode_pair, score_continuations


def read_multiple_choice(path, limit: int | None = None) -> list[dict]:
    """Records of a multiple-choice JSONL file, validated (errors name file:line); the first `limit` if given."""
    records = []
    for line, rec in read_jsonl(path):
        q, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
        if not isinstance(q, str):
            raise ValueError(f"{path}:{line}: 'question' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{path}:{line}: 'choices' must be a list of at least 2 non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise ValueError(f"{path}:{line}: 'answer' must be a 0-based index or one of the choices")
        if isinstance(answer, str):
            if answer not in choices:
                raise ValueError(f"{path}:{line}: answer {answer!r} is not one of the choices {choices}")
            answer = choices.index(answer)
        if not 0 <= answer < len(choices):
            raise ValueError(f"{path}:{line}: answer index {answer} outside [0, {len(choices)})")
        records.append({**rec, "answer": answer})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(raw prediction, length-normalised prediction) from the choices' log-likelihoods."""
    return argmax(lls), argmax([ll / len(c) for ll, c in zip(lls, choices)])


def mean_stderr(xs: Sequence[float]) -> float:
    """Sample standard deviation / √n (0 for fewer than 2 values)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def prompt_text(tokenizer, question: str, template: str, chat: bool) -> str:
    text = template.format(question=question)
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return text


def evaluate_multiple_choice(model, tokenizer, records: Sequence[Mapping], *, template: str = "{question}",
                             target_delimiter: str = " ", chat: bool = False, batch_size: int = 16,
                             max_length: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """(metrics {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}, one sample per question)."""
    requests, spans = [], []
    for rec in records:
        context = prompt_text(tokenizer, rec["question"], template, chat)
        delim = "" if chat else target_delimiter
        spans.append((len(requests), len(rec["choices"])))
        requests += [encode_pair(tokenizer, context, delim + c) for c in rec["choices"]]
    scores = score_continuations(model, requests, batch_size=batch_size, max_length=max_length)
    acc, acc_norm, samples = [], [], []
    for rec, (start, n) in zip(records, spans):
        lls = [s for s, _ in scores[start:start + n]]
        pred, pred_norm = predictions(lls, rec["choices"])
        acc.append(float(pred == rec["answer"]))
        acc_norm.append(float(pred_norm == rec["answer"]))
        samples.append({"question": rec["question"], "answer": rec["answer"], "loglikelihoods": lls,
                        "pred": pred, "pred_norm": pred_norm})
    metrics = {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm),
               "acc_stderr": mean_stderr(acc), "acc_norm_stderr": mean_stderr(acc_norm)}
    return metrics, samples
