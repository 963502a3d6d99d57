"""What `elleci eval` writes to out_dir: results.json, results.md and per-task samples.

    out_dir/results.json        {"elleci_version", "model", "adapter", "tokenizer", "settings", "tasks", "metrics",
                                 "started", "seconds"}
    out_dir/results.md          the metrics as a Markdown table (also printed)
    out_dir/samples/<name>.jsonl   one line per item of an offline task (completions, log-likelihoods, judgements)
    out_dir/lm_eval/<i>.json    lm-eval's full results of the i-th harness task entry (configs, versions, n-shot)
Every file is written atomically.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._io import atomic_path, write_json_atomic


def markdown_table(metrics: Mapping[str, float]) -> str:
    """| task | metric | value | rows, one per "eval/<task>/<metric>" key, in key order."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for key, value in metrics.items():
        _, task, metric = key.split("/", 2) if key.count("/") >= 2 else ("", key, "")
        lines.append(f"| {task} | {metric} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_jsonl(path: Path, rows: Sequence[Mapping]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_results(out_dir, record: Mapping, samples: Mapping[str, list | dict]) -> Path:
    """Write results.json (record), results.md and every task's samples; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, rows) in enumerate(samples.items()):
        if isinstance(rows, dict):                  # lm-eval's own results dict
            _write_text(out / "lm_eval" / f"{i}.json", json.dumps(rows, indent=2, default=str) + "\n")
        else:
            write_jsonl(out / "samples" / f"{name}.jsonl", rows)
    write_json_atomic(out / "results.json", json.loads(json.dumps(record, default=str)))
    _write_text(out / "results.md", markdown_table(record["metrics"]))
    return out
