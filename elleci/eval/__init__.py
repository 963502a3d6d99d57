"""Evaluation: elleci models in lm-evaluation-harness, and offline evaluations that need no download.

    from elleci.eval import run_tasks
    metrics = run_tasks(model, tok, [{"type": "multiple_choice", "path": "configs/eval/data/mc_it.jsonl"}])
    # {"eval/mc_it/acc": 0.25, "eval/mc_it/acc_norm": 0.31, ...}

    python -m elleci.eval configs/eval/offline_it.toml --model out/sft         # `elleci eval` (see command.py)
    python -m elleci.eval.lm_eval_cli --model elleci --model_args path=out/sft --tasks arc_it   # lm-eval's CLI

Modules: `scoring` (log-likelihoods through the fused kernel, rolling windows), `generate` (batched
generation with per-sequence stop strings), `loading` (model + adapter + tokenizer), `harness` (the lm-eval
`LM`, needs `pip install elleci[eval]`; `lm_eval_cli` is lm-eval's command line with it registered), one
module per offline evaluation (`perplexity`, `multiple_choice`, `verified_generation`, `win_rate`),
`lm_eval_tasks` (harness tasks on an in-memory model), `export` (a harness multiple-choice task → a local
JSONL), `tasks` (`run_tasks`: a task list → one flat metric dict), `report` (results JSON + Markdown),
`command` (`elleci eval`). Nothing here imports lm_eval until a harness task runs.
"""
from .scoring import rolling_windows, score_continuations, score_rolling
from .generate import generate_until
from .loading import load_model, load_tokenizer
from .tasks import run_task, run_tasks

__all__ = ["score_continuations", "score_rolling", "rolling_windows", "generate_until", "load_model",
           "load_tokenizer", "run_task", "run_tasks"]
