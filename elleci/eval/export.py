"""Store N documents of an lm-eval multiple-choice task as a local JSONL, for evaluation inside training.

    python -m elleci.eval.export arc_it configs/eval/data/arc_it_200.jsonl --limit 200      # on a machine with the data
    # then, in a training config's [eval] tasks (or any task list), with no lm-eval and no download at run time:
    # {type = "multiple_choice", path = "configs/eval/data/arc_it_200.jsonl", target_delimiter = " "}

Each record is {"question": the harness's zero-shot prompt (the task's description + doc_to_text),
"choices": doc_to_choice, "answer": the gold index}, so the offline multiple-choice task with the default
template "{question}" and the task's target delimiter (printed; " " for nearly every task) scores each
document exactly as lm-eval does zero-shot: the same (context, continuation) strings, the same acc and
acc_norm. Documents come from the test split (else validation), in the harness's order, the first `limit`.
Tasks whose choices are contexts (`multiple_input`, e.g. winogrande) or with several gold answers are refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .report import write_jsonl


def export_multiple_choice(task_name: str, out, *, limit: int | None = None, include_path: str | None = None) -> str:
    """Write the first `limit` documents of `task_name` to `out` (JSONL); returns the task's target delimiter."""
    from .lm_eval_tasks import task_manager

    tasks = task_manager([task_name], include_path).load([task_name])["tasks"]
    if list(tasks) != [task_name]:
        raise ValueError(f"{task_name!r} is a group of {len(tasks)} tasks; export its tasks one by one: {sorted(tasks)}")
    task = tasks[task_name]
    if task.OUTPUT_TYPE != "multiple_choice" or task.multiple_input or task.multiple_target:
        raise ValueError(f"{task_name}: only single-answer multiple-choice tasks can be exported "
                         f"(output_type={task.OUTPUT_TYPE}, multiple_input={task.multiple_input})")
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    if docs is None:
        raise ValueError(f"{task_name}: no test or validation split")
    rows = []
    for doc in docs:
        choices = list(task.doc_to_choice(doc))
        gold = task.doc_to_target(doc)
        gold = choices.index(gold) if isinstance(gold, str) else int(gold)
        rows.append({"question": task.fewshot_context(doc, 0), "choices": choices, "answer": gold})
        if limit is not None and len(rows) >= limit:
            break
    write_jsonl(Path(out), rows)
    return task.config.target_delimiter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m elleci.eval.export", description=__doc__.splitlines()[0])
    ap.add_argument("task", help="an lm-eval multiple-choice task, e.g. arc_it")
    ap.add_argument("out", help="the JSONL file to write")
    ap.add_argument("--limit", type=int, help="the first N documents")
    ap.add_argument("--include-path", help="directory of extra task YAMLs")
    args = ap.parse_args(argv)
    delimiter = export_multiple_choice(args.task, args.out, limit=args.limit, include_path=args.include_path)
    print(f"wrote {args.out}; evaluate with {{type = \"multiple_choice\", path = \"{args.out}\", "
          f"target_delimiter = {delimiter!r}}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
