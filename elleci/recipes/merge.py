"""`elleci merge CONFIG`: merge models with the merge runner of `elleci.algos` (linear, task_arithmetic, ties,
dare_linear, dare_ties, slerp, regmean), from its JSON config or the same keys in TOML:

    method = "ties"
    base = "runs/tiny/sft/final"
    models = ["runs/tiny/dpo/final", "runs/tiny/iterative_dpo/final"]
    output = "runs/tiny/merged"
    [params]
    density = 0.5

A model may also be an adapter directory written by a LoRA stage, an original .pth or a preset: it is loaded
(adapters merged into the weights) and handed to the runner through a temporary directory beside `output`,
deleted afterwards. Adapters on the BitLinear FFN (w1, w2, w3) cannot be merged and are refused by name.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from elleci._io import write_json_atomic
from elleci.config_schema import read_toml

import elleci.algos.merging.merge_config as merge_config_algos
from .loading import load_model, load_tokenizer, model_kind


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elleci merge", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="merge config, .toml or .json (keys: method, models, output, base, weights, "
                                  "params, gram_data; see elleci.algos merge_config.MergeConfig)")
    return p


def read_config(path: str) -> dict:
    if path.endswith(".toml"):
        return read_toml(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    mc = merge_config_algos
    raw = read_config(args.config)
    try:
        cfg = mc.MergeConfig.from_dict(raw)                 # checked before any model is read
        kinds = {p: model_kind(p) for p in cfg.models + ([cfg.base] if cfg.base else [])}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{args.config}: {e}") from None
    staged = {p: k for p, k in kinds.items() if k != "model"}
    tmp = None
    try:
        if staged:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".merge-inputs-", dir=Path(cfg.output).parent))
            for i, path in enumerate(staged):
                print(f"loading {path} ({staged[path]}) for the merge")
                model = load_model(path)
                tok = load_tokenizer(path) if _has_tokenizer(path) else None
                model.save_pretrained(tmp / str(i), tokenizer=tok)
            where = {p: str(tmp / str(i)) for i, p in enumerate(staged)}
            raw = {**raw, "models": [where.get(p, p) for p in cfg.models]}
            if cfg.base:
                raw["base"] = where.get(cfg.base, cfg.base)
        mc.run_merge(mc.MergeConfig.from_dict(raw))
        if staged:                                        # record the inputs as given, not the temporary copies
            write_json_atomic(Path(cfg.output) / "merge_config.json", dataclasses.asdict(cfg))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {len(cfg.models)} models with {cfg.method}: wrote {cfg.output}")
    return 0


def _has_tokenizer(path: str) -> bool:
    try:
        load_tokenizer(path)
        return True
    except ValueError:
        return False
