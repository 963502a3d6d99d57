"""`elleci eval`: lm-eval tasks and offline evaluations on one model, from a TOML config and/or flags.

    python -m elleci.eval configs/eval/offline_it.toml --model out/sft --out-dir out/eval/sft
    python -m elleci.eval configs/eval/italian.toml model.path=out/sft model.dtype=bfloat16 tasks.0.limit=200
    python -m elleci.eval --model out/sft --tasks arc_it,hellaswag_it --limit 200      # flags only
    python -m elleci.eval --model out/sft --mc configs/eval/data/mc_it.jsonl --perplexity configs/eval/data/testo_it.txt

Config (all tables optional; flags and `key=value` overrides win):

    out_dir = "out/eval"
    [model]
    path = "out/sft"              # a save_pretrained directory or an original .pth
    adapter = "out/dpo/adapter"   # optional LoRA adapter directory
    tokenizer = "out/sft"         # default: path
    dtype = "bfloat16"            # default: the checkpoint's
    device = "cuda"               # default: cuda when available
    [[tasks]]                     # one table per task: see elleci.eval.tasks for every type and key
    type = "multiple_choice"
    path = "configs/eval/data/mc_it.jsonl"

Overrides `a.b=value` set config[a][b] (a number indexes the task list: `tasks.0.limit=50`); the value is
read as TOML (`true`, `200`, `"x"`, `["a", "b"]`) and else kept as a string. Everything is checked before
the model is loaded. Results: out_dir/results.json (model, adapter, settings, elleci version, metrics),
results.md, samples/ (see elleci.eval.report); the table is printed.
"""
from __future__ import annotations

import argparse
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from .loading import default_device, load_model, load_tokenizer, parse_dtype
from .report import markdown_table, write_results
from .tasks import check_task, run_task

MODEL_KEYS = {"path", "adapter", "tokenizer", "dtype", "device"}
TOP_KEYS = {"out_dir", "model", "tasks"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `elleci eval` (shared by `python -m elleci.eval` and the `elleci` command)."""
    parser.add_argument("config", nargs="?", help="TOML config ([model], [[tasks]], out_dir)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--model", help="model: a save_pretrained directory or an original .pth (model.path)")
    parser.add_argument("--adapter", help="LoRA adapter directory (model.adapter)")
    parser.add_argument("--tokenizer", help="tokenizer directory or file (default: the model directory)")
    parser.add_argument("--dtype", help="bfloat16, float32, float16, float64 (default: the checkpoint's)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out-dir", help="where results go (out_dir; default out/eval)")
    parser.add_argument("--tasks", help="lm-eval task names, comma-separated (adds one lm_eval task)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples for the --tasks entry")
    parser.add_argument("--include-path", help="directory of extra lm-eval task YAMLs, for the --tasks entry")
    parser.add_argument("--mc", action="append", default=[], metavar="JSONL", help="add a multiple_choice task")
    parser.add_argument("--perplexity", action="append", default=[], metavar="FILE", help="add a perplexity task")
    parser.add_argument("--generation", action="append", default=[], metavar="JSONL",
                        help="add a generation task (needs --verifier)")
    parser.add_argument("--verifier", help="module:function for the --generation tasks")
    parser.add_argument("--chat", action="store_true", help="chat template for every task that has the setting")
    parser.add_argument("--limit", type=int, help="items per task (every task)")
    parser.add_argument("--batch-size", type=int, help="batch size (every task)")


def _toml_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(config: dict, item: str) -> None:
    """Set config[a][b]... from "a.b=value" (list indices as numbers)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    parts, node = key.split("."), config
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a task index "
                                 f"(the config has {len(node)} tasks)")
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if node is config and part == "tasks" else {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a table")
    if isinstance(node, list):
        raise ValueError(f"override {item!r}: set a key of one task, e.g. tasks.0.limit=50")
    node[parts[-1]] = _toml_value(value)


def build_config(args: argparse.Namespace) -> dict:
    """The config file, then overrides, then flags → a checked config dict (nothing loaded yet)."""
    config: dict = {}
    if args.config and "=" in args.config and not Path(args.config).is_file():   # overrides without a config
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} not found")
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    for item in args.overrides:
        apply_override(config, item)
    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    model = dict(config.get("model", {}))
    for key in MODEL_KEYS:
        if getattr(args, key if key != "path" else "model") is not None:
            model[key] = getattr(args, key if key != "path" else "model")
    if sorted(set(model) - MODEL_KEYS):
        raise ValueError(f"[model]: unknown key(s) {sorted(set(model) - MODEL_KEYS)}; allowed: {sorted(MODEL_KEYS)}")
    if "path" not in model:
        raise ValueError("no model: give --model PATH or [model] path = ... in the config")
    parse_dtype(model.get("dtype"))
    if not isinstance(config.get("tasks", []), list) or not all(isinstance(t, dict) for t in config.get("tasks", [])):
        raise ValueError("config: tasks must be an array of tables ([[tasks]])")
    tasks = [dict(t) for t in config.get("tasks", [])]
    if args.tasks:
        entry = {"type": "lm_eval", "tasks": args.tasks}
        entry.update({k: v for k, v in (("num_fewshot", args.num_fewshot), ("include_path", args.include_path))
                      if v is not None})
        tasks.append(entry)
    tasks += [{"type": "multiple_choice", "path": p} for p in args.mc]
    tasks += [{"type": "perplexity", "path": p} for p in args.perplexity]
    if args.generation and not args.verifier:
        raise ValueError("--generation needs --verifier module:function")
    tasks += [{"type": "generation", "path": p, "verifier": args.verifier} for p in args.generation]
    if not tasks:
        raise ValueError("no tasks: give [[tasks]] in the config, or --tasks / --mc / --perplexity / --generation")
    for t in tasks:
        for flag, key in ((args.limit, "limit"), (args.batch_size, "batch_size")):
            if flag is not None:
                t[key] = flag
        if args.chat:
            t["apply_chat_template" if t.get("type") == "lm_eval" else "chat"] = True
    checked = [check_task(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
    return {"out_dir": args.out_dir or config.get("out_dir", "out/eval"), "model": model, "tasks": checked}


def main(argv: list[str] | None = None) -> int:
    """`elleci eval ...`: parse `argv` (default sys.argv[1:]) and `run` it."""
    parser = argparse.ArgumentParser(prog="elleci eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the tasks of parsed `add_arguments` flags, write out_dir, print the table; 0 on success.
    Bad input raises ValueError / FileNotFoundError naming the key or file, before the model is loaded."""
    config = build_config(args)
    m = config["model"]
    device = m.get("device") or default_device()
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    model = load_model(m["path"], adapter=m.get("adapter"), dtype=m.get("dtype"), device=device)
    tokenizer = load_tokenizer(m.get("tokenizer") or m["path"])
    metrics, samples = {}, {}
    for i, task in enumerate(config["tasks"]):
        new, rows = run_task(model, tokenizer, task, device=device)
        clash = sorted(set(new) & set(metrics))
        if clash:
            raise ValueError(f"metric names {clash} come from two tasks; give the tasks different `name`s")
        metrics.update(new)
        samples[task.get("name", f"lm_eval_{i}")] = rows
        print(f"task {i} ({task['type']}, {task.get('name', ','.join(task.get('tasks', [])))}) done, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    record = {"elleci_version": __version__, "model": m["path"], "adapter": m.get("adapter"),
              "tokenizer": m.get("tokenizer") or m["path"],
              "settings": {"dtype": str(next(model.parameters()).dtype), "device": str(device)},
              "tasks": config["tasks"], "metrics": metrics, "started": started,
              "seconds": round(time.perf_counter() - t0, 3)}
    out = write_results(config["out_dir"], record, samples)
    print(markdown_table(metrics), end="")
    print(f"results in {out}/results.json")
    return 0
