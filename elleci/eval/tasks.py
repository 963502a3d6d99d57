"""`run_tasks`: an evaluation task list → one flat metric dict (what `elleci eval` and the trainer's periodic
eval call).

    metrics = run_tasks(model, tok, [
        {"type": "multiple_choice", "path": "configs/eval/data/mc_it.jsonl",
         "template": "Domanda: {question}\\nRisposta:"},
        {"type": "lm_eval", "tasks": ["arc_it"], "limit": 200},
    ])
    # {"eval/mc_it/acc": 0.4, "eval/mc_it/acc_norm": 0.45, ..., "eval/arc_it/acc": 0.27, ...}

Task dicts (TOML `[[tasks]]` tables); every key is checked, unknown ones are refused by name. Per type:
required keys; optional keys (default); metrics.

- multiple_choice: path; name (the file's stem), template ("{question}"), target_delimiter (" "), chat (false);
  acc, acc_norm, acc_stderr, acc_norm_stderr.
- perplexity: path; name, field ("text", for JSONL); token_perplexity, word_perplexity, byte_perplexity,
  bits_per_byte.
- generation: path, verifier ("module:function"); name, chat (false), until, max_new_tokens (64),
  temperature (0.0), seed (0); score.
- win_rate: path, baseline, judge (paths, or "self": the evaluated model); name, baseline_adapter,
  baseline_tokenizer, judge_adapter, judge_tokenizer, template ("it"), judge_chat (true), max_new_tokens (128),
  dtype; win_rate, win_rate_hard, consistency.
- lm_eval: tasks (names, or one comma-separated string); num_fewshot, include_path, apply_chat_template
  (false), max_gen_toks (256), bootstrap_iters (1000), seed (0); lm-eval's metrics, per task and group.

Every type also takes `limit` (the first N items; for lm_eval, N documents per task), `batch_size` (16)
and `max_length` (2048). Metric keys are "eval/<name>/<metric>"; for lm_eval tasks <name> is lm-eval's
task (or group) name, so a harness metric "acc,none" of arc_it is "eval/arc_it/acc". Paths are relative to
the working directory.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data import read_text
from .loading import load_model, load_tokenizer

COMMON = {"type", "name", "limit", "batch_size", "max_length"}
KEYS = {
    "multiple_choice": ({"path"}, {"template", "target_delimiter", "chat"}),
    "perplexity": ({"path"}, {"field"}),
    "generation": ({"path", "verifier"}, {"chat", "until", "max_new_tokens", "temperature", "seed"}),
    "win_rate": ({"path", "baseline", "judge"}, {"baseline_adapter", "baseline_tokenizer", "judge_adapter",
                                                 "judge_tokenizer", "template", "judge_chat", "max_new_tokens", "dtype"}),
    "lm_eval": ({"tasks"}, {"num_fewshot", "include_path", "apply_chat_template", "max_gen_toks", "bootstrap_iters",
                            "seed"}),
}


def check_task(task: Mapping, where: str = "task") -> dict:
    """A validated copy of one task dict (ValueError naming `where` and the key otherwise)."""
    if not isinstance(task, Mapping):
        raise ValueError(f"{where}: expected a table of settings, got {type(task).__name__}")
    kind = task.get("type")
    if kind not in KEYS:
        raise ValueError(f"{where}: type={kind!r}; choose one of {sorted(KEYS)}")
    required, optional = KEYS[kind]
    missing = sorted(required - set(task))
    if missing:
        raise ValueError(f"{where} ({kind}): missing {missing}")
    unknown = sorted(set(task) - required - optional - COMMON)
    if unknown:
        raise ValueError(f"{where} ({kind}): unknown key(s) {unknown}; allowed: {sorted(required | optional | COMMON)}")
    for key in ("limit", "batch_size", "max_length", "max_new_tokens", "max_gen_toks"):
        if key in task and (isinstance(task[key], bool) or not isinstance(task[key], int) or task[key] < 1):
            raise ValueError(f"{where} ({kind}): {key}={task[key]!r} must be a positive integer")
    out = dict(task)
    if kind == "lm_eval":
        names = out["tasks"].split(",") if isinstance(out["tasks"], str) else out["tasks"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"{where} (lm_eval): tasks must be a non-empty list of task names")
        out["tasks"] = [n.strip() for n in names]
    else:
        if not Path(out["path"]).is_file():
            raise FileNotFoundError(f"{where} ({kind}): path {out['path']} is not a file")
        out.setdefault("name", Path(out["path"]).stem)
    return out


def _other_model(task: Mapping, role: str, model, tokenizer, device):
    """(model, tokenizer) for a win-rate baseline/judge: "self" is the evaluated model."""
    if task[role] == "self":
        return model, tokenizer
    other = load_model(task[role], adapter=task.get(f"{role}_adapter"), dtype=task.get("dtype"), device=device)
    return other, load_tokenizer(task.get(f"{role}_tokenizer") or task[role])


def run_task(model, tokenizer, task: Mapping, *, device=None) -> tuple[dict[str, float], list[dict] | dict]:
    """One task → (metrics named "eval/<name>/<metric>", its samples: per-item dicts, or lm-eval's results)."""
    task = check_task(task)
    kind, limit, bs = task["type"], task.get("limit"), task.get("batch_size", 16)
    max_length = task.get("max_length", 2048)
    if kind == "lm_eval":
        from .lm_eval_tasks import run_harness
        flat, results = run_harness(model, tokenizer, task["tasks"], num_fewshot=task.get("num_fewshot"), limit=limit,
                                    include_path=task.get("include_path"),
                                    apply_chat_template=task.get("apply_chat_template", False), batch_size=bs,
                                    max_length=max_length, max_gen_toks=task.get("max_gen_toks", 256),
                                    bootstrap_iters=task.get("bootstrap_iters", 1000), random_seed=task.get("seed", 0))
        return {f"eval/{k}": v for k, v in flat.items()}, results
    if kind == "multiple_choice":
        from .multiple_choice import evaluate_multiple_choice, read_multiple_choice
        metrics, samples = evaluate_multiple_choice(
            model, tokenizer, read_multiple_choice(task["path"], limit), template=task.get("template", "{question}"),
            target_delimiter=task.get("target_delimiter", " "), chat=task.get("chat", False), batch_size=bs,
            max_length=max_length)
    elif kind == "perplexity":
        from .perplexity import evaluate_perplexity
        docs = read_text(task["path"], field=task.get("field", "text"))[:limit]
        metrics, samples = evaluate_perplexity(model, tokenizer, docs, max_length=max_length, batch_size=bs)
    elif kind == "generation":
        from .verified_generation import evaluate_generation, read_generation
        metrics, samples = evaluate_generation(
            model, tokenizer, read_generation(task["path"], limit), verifier=task["verifier"],
            chat=task.get("chat", False), until=task.get("until"), max_new_tokens=task.get("max_new_tokens", 64),
            temperature=task.get("temperature", 0.0), seed=task.get("seed", 0), batch_size=bs)
    else:
        from .win_rate import evaluate_win_rate, read_prompts
        device = device if device is not None else next(model.parameters()).device
        baseline, baseline_tok = _other_model(task, "baseline", model, tokenizer, device)
        judge, judge_tok = _other_model(task, "judge", model, tokenizer, device)
        metrics, samples = evaluate_win_rate(
            model, tokenizer, baseline, baseline_tok, judge, judge_tok, read_prompts(task["path"], limit),
            template=task.get("template", "it"), judge_chat=task.get("judge_chat", True),
            max_new_tokens=task.get("max_new_tokens", 128), batch_size=bs)
    return {f"eval/{task['name']}/{k}": v for k, v in metrics.items()}, samples


def run_tasks(model, tokenizer, tasks: Sequence[Mapping], *, device=None) -> dict[str, float]:
    """Run every task of `tasks` on `model` and return one flat dict of floats, "eval/<task>/<metric>".

    The contract the trainer's periodic eval relies on (`[eval] tasks` of a training config):
    - model: an ElleciLM (LoRA adapters on or merged; unwrap DDP/FSDP first), on its device; tokenizer: its
      `elleci.model.Tokenizer`. The model's train/eval mode is restored and no gradient is kept.
    - tasks: task dicts as in this module's table (checked first: a bad task fails before any runs).
    - device: where the baseline / judge models of win_rate tasks are loaded (default: the model's device).
    - returns e.g. {"eval/mc_it/acc": 0.4, "eval/mc_it/acc_norm": 0.45, "eval/arc_it/acc": 0.27}; keys are
      unique across tasks (a clash raises ValueError), values are Python floats.
    - Python's, NumPy's and torch's global random states are the same after the call as before
      (lm-eval seeds them), so an eval inside training does not change the training run.
    """
    checked = [check_task(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
    metrics: dict[str, float] = {}
    for task in checked:
        new, _ = run_task(model, tokenizer, task, device=device)
        clash = sorted(set(new) & set(metrics))
        if clash:
            raise ValueError(f"metric names {clash} come from two tasks; give the tasks different `name`s")
        metrics.update(new)
    return metrics
