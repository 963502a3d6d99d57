"""The shipped configs: every file reads and checks; the elleci-v1 ones fit a 12 GB GPU by the memory plan."""
import functools
import importlib
from pathlib import Path

import pytest
import torch

from elleci.cli import STAGES
from elleci.config_schema import load_config, read_toml
from elleci.model import ElleciConfig
from elleci.model.lora import LoraConfig
from elleci.plan import memory_plan

ROOT = Path(__file__).resolve().parents[1]
FILES = {"sft": "sft", "dpo": "dpo", "una": "una", "reward_model": "reward-model", "iterative_dpo": "iterative-dpo",
         "rlaif_v": "rlaif-v", "grpo": "grpo"}
TINY_DATA = {"sft": "chat", "dpo": "pairs", "una": "feedback", "reward_model": "pairs", "iterative_dpo": "prompts",
             "rlaif_v": "passages", "grpo": "prompts"}


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _load(directory: str, name: str, extra=()):
    module = importlib.import_module(STAGES[FILES[name]][0])
    over = ["model.path=tiny", "model.tokenizer=configs/tiny/tokenizer.model",
            f"data.train=configs/tiny/data/{TINY_DATA[name]}.jsonl", "data.eval=", *extra]
    if name == "grpo":
        over.append("reward.verifier=configs/tiny/verifier.py:reward")
    return module, load_config(module.Config, ROOT / "configs" / directory / f"{name}.toml", over)


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("directory", ["tiny", "elleci-v1"])
def test_every_shipped_config_reads_and_checks(directory, name):
    _, cfg = _load(directory, name)
    assert cfg.out_dir.startswith(f"runs/{directory}/")


def test_merge_configs_read():
    mc = importlib.import_module("elleci.algos.merging.merge_config")
    for d in ("tiny", "elleci-v1"):
        cfg = mc.MergeConfig.from_dict(read_toml(ROOT / "configs" / d / "merge.toml"))
        assert cfg.method == "ties" and len(cfg.models) == 2


@functools.cache
def _peak(sequences: int, length: int, documents: bool = False) -> int:
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["in_proj", "out_proj", "w_q", "w_kv_down", "w_kv_up",
                                                           "w_out"])
    return memory_plan(ElleciConfig.from_name("elleci-v1"), dtype=torch.bfloat16, lora=lora, sequences=sequences,
                       length=length, checkpointing=True, cuda=True, documents=documents).peak


@pytest.mark.parametrize("name", sorted(FILES))
def test_elleci_v1_configs_fit_a_12gb_gpu_by_the_plan(name):
    module, cfg = _load("elleci-v1", name)
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing and cfg.lora.r == 16
    shape = module.plan_shape(cfg)
    assert not shape["reference_copy"]
    assert _peak(shape["sequences_per_micro_batch"], cfg.data.max_length, shape.get("documents", False)) < 11 * 2 ** 30
