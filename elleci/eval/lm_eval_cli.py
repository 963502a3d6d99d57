"""lm-eval's own command line with the "elleci" model registered (lm-eval has no plugin discovery).

    python -m elleci.eval.lm_eval_cli --model elleci --model_args path=out/sft,dtype=bfloat16,batch_size=16 \\
        --tasks arc_it,hellaswag_it --output_path out/lm_eval

Every lm-eval flag works as with `lm_eval` itself; `--model hf` and the other harness models stay available.
"""
from __future__ import annotations


def main() -> None:
    from . import harness  # noqa: F401  (registers "elleci")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
