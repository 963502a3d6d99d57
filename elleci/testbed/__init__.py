"""The experiment harness of the examples: small cached bases, the roadmap chained on generated tasks, the
completion functions and rewards that connect techniques (`elleci.algos`) with tasks (`elleci.tasks`).

    pipeline         build / cache a small base, SFT with LoRA, DPO / UNA stages, seed tables
    grounded_base    the grounded-QA base of RLAIF-V and corpus distillation
    completion       `completer(model, tok)`: the completion function the tasks' evaluators take
    arithmetic_rewards   GRPO's verifiable rewards on the arithmetic task
    distill_eval     scoring distilled records against the documents task's facts

The testbed may import anything in elleci; nothing in elleci imports it.
"""
