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

from .._io import write_json_atomic, write_jsonl_atomic, write_text_atomic


def markdown_table(metrics: Mapping[str, float]) -> str:
    """| task | metric | value | rows, one per "eval/<task>/<metric>" key, in key order."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for key, value in metrics.items():
        _, task, metric = key.split("/", 2) if key.count("/") >= 2 else ("", key, "")
        lines.append(f"| {task} | {metric} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def write_jsonl(path: Path, rows: Sequence[Mapping]) -> None:
    write_jsonl_atomic(path, rows)


def write_results(out_dir, record: Mapping, samples: Mapping[str, list | dict]) -> Path:
    """Write results.json (record), results.md and every task's samples; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, rows) in enumerate(samples.items()):
        if isinstance(rows, dict):                  # lm-eval's own results dict
            write_text_atomic(out / "lm_eval" / f"{i}.json", json.dumps(rows, indent=2, default=str) + "\n")
        else:
            write_jsonl(out / "samples" / f"{name}.jsonl", rows)
    write_json_atomic(out / "results.json", json.loads(json.dumps(record, default=str)))
    write_text_atomic(out / "results.md", markdown_table(record["metrics"]))
    return out
