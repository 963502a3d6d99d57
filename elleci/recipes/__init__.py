"""One module per stage of the `elleci` command (sft, dpo, una, reward_model, iterative_dpo, rlaif_v, grpo)
and its tools (convert, generate, merge), all on the one trainer (`elleci.trainer`). Each stage module has
`Config` (its TOML schema), `plan_shape(cfg)` (for --plan) and `run(cfg, allow_changes=())`."""
