"""`elleci`: the command line. One subcommand per stage of the roadmap, each with a TOML config.

    elleci convert elleci_v1_final.pth runs/v1 --tokenizer tokenizer.json
    elleci sft configs/elleci-v1/sft.toml [section.key=value ...] [--plan] [--allow-change KEY]
    elleci generate runs/v1-sft/final                    # interactive ChatML chat (stops at <|im_end|>)
    elleci <stage> --help                                # every setting with its default

Training stages read the config and the data and check them before anything is loaded or written; errors
name the file, the key or the file:line and exit with status 2. Re-running a stage with the same out_dir
resumes it; SIGINT/SIGTERM save a checkpoint and exit with status 128 + the signal number.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

STAGES = {
    "sft": ("elleci.recipes.sft", "supervised fine-tuning on chat / Alpaca / OpenOrca JSONL"),
    "dpo": ("elleci.recipes.dpo", "preference optimisation: dpo, cdpo, ipo, hinge, robust"),
    "una": ("elleci.recipes.una", "UNA on binary (thumbs up/down) or scored feedback"),
    "reward-model": ("elleci.recipes.reward_model", "a reward model from (soft) preference pairs"),
    "iterative-dpo": ("elleci.recipes.iterative_dpo", "online DPO rounds; rewards from a verifier, the policy "
                                                      "judging itself (RLAIF), a judge model or a reward model"),
    "rlaif-v": ("elleci.recipes.rlaif_v", "RLAIF-V: pairs from claims verified against a passage field"),
    "grpo": ("elleci.recipes.grpo", "GRPO with rewards from a module:function verifier"),
    "fslora": ("elleci.recipes.fslora", "FSLoRA: federated sketching LoRA, clients simulated or on ranks"),
}
TOOLS = {
    "convert": ("elleci.recipes.convert", "an original .pth (or a preset) -> an elleci model directory"),
    "generate": ("elleci.recipes.generate", "a prompt, or an interactive chat, from a model or adapter"),
    "merge": ("elleci.recipes.merge", "merge models (linear, task arithmetic, ties, dare, slerp, regmean)"),
    "eval": ("elleci.eval.command", "evaluate a model (lm-evaluation-harness tasks, offline tasks)"),
}


def overview() -> str:
    width = max(map(len, {**STAGES, **TOOLS}))
    lines = [__doc__.split("\n\n")[0], "", "usage: elleci <command> ...", "", "training stages (CONFIG.toml):"]
    lines += [f"  {k:<{width}}  {h}" for k, (_, h) in STAGES.items()]
    lines += ["", "tools:"] + [f"  {k:<{width}}  {h}" for k, (_, h) in TOOLS.items()]
    lines += ["", "`elleci <command> --help` lists its settings with their defaults."]
    return "\n".join(lines)


def stage_parser(name: str, module) -> argparse.ArgumentParser:
    from elleci.config_schema import help_lines
    p = argparse.ArgumentParser(
        prog=f"elleci {name}", description=(module.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (TOML; override any as section.key=value):\n" + "\n".join(help_lines(module.Config)))
    p.add_argument("config", help="the run's TOML config")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that replace the file's")
    p.add_argument("--plan", action="store_true", help="print the memory plan and the tokens per optimizer step, "
                                                       "load nothing, train nothing")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although KEY (e.g. train.steps) differs from the checkpoint's; repeatable")
    return p


def _fail(cmd: str, e: BaseException) -> int:
    if os.environ.get("ELLECI_DEBUG"):
        raise e
    if os.environ.get("RANK", "0") == "0":                # under torchrun: the error once, from rank 0
        print(f"elleci {cmd}: error: {e}", file=sys.stderr)
    return 2


def run_stage(name: str, argv) -> int:
    from elleci.config_schema import ConfigError, load_config
    from elleci.trainer import TrainingInterrupted
    module = importlib.import_module(STAGES[name][0])
    args = stage_parser(name, module).parse_intermixed_args(argv)
    try:
        cfg = load_config(module.Config, args.config, args.overrides)
        if args.plan:
            from elleci.plan import plan_for_stage
            return plan_for_stage(cfg, module.plan_shape(cfg))
        _refuse_what_cannot_fit(cfg, module)
        from elleci.trainer import distributed
        distributed.init_from_env(cfg.model.device)      # under torchrun: join the group (gloo / NCCL)
        try:
            module.run(cfg, allow_changes=args.allow_change)
        finally:
            distributed.shutdown()
    except TrainingInterrupted as e:
        print(f"elleci {name}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(name, e)
    return 0


def _refuse_what_cannot_fit(cfg, module) -> None:
    """On CUDA, the memory plan is checked against the free device memory before anything loads."""
    from elleci.recipes.loading import resolve_device
    if resolve_device(cfg.model.device).type == "cuda":
        from elleci.plan import check_fits, plan_for_config
        check_fits(cfg, plan_for_config(cfg, module.plan_shape(cfg)))


def run_tool(name: str, argv) -> int:
    try:
        module = importlib.import_module(TOOLS[name][0])
    except ImportError as e:
        return _fail(name, RuntimeError(f"{TOOLS[name][0]} is not available in this installation ({e})"))
    try:
        return int(module.main(list(argv)) or 0)
    except SystemExit as e:                               # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(name, e)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in STAGES:
        return run_stage(cmd, rest)
    if cmd in TOOLS:
        return run_tool(cmd, rest)
    close = difflib.get_close_matches(cmd, list(STAGES) + list(TOOLS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"elleci: unknown command {cmd!r}{hint}\n\n{overview()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
