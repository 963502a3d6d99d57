"""The grounded-QA base model: a small Elleci pretrained on `grounded_qa.pretraining_texts`, cached on disk.

    cfg = GroundedBaseConfig()                                   # the defaults of examples/rlaif_v.py
    train = grounded_qa.make_items(cfg.n_train, seed=0, people=cfg.people)
    model, tok = cached_grounded_base(cfg, seed=0, train=train, cache_dir="out/bases")

Used by `examples/rlaif_v.py` (RLAIF-V) and `examples/distill.py` (its LM agents). The base is saved under
cache_dir/grounded_qa-seed<s>-<hash of the settings> and loaded from there when its `cache.json` (written last)
exists. Each pretraining row is one text + EOS with every token scored, so a passage is never cut from its
question. Defaults from a scratch study (seed 0): attention-only layers ("A") and one person per passage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from elleci._checks import check_int, check_number, fail
from elleci._io import write_json_atomic
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.sft import sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.tasks import grounded_qa
from elleci.testbed.pipeline import build_tokenizer


@dataclass(frozen=True)
class GroundedBaseConfig:
    """Every setting that determines the base (with the seed); all of them key its cache directory."""
    n_train: int = 3000           # training passages (pretraining text; SFT and prompts use the same items)
    people: int = 1               # people per passage
    layout: str = "A"             # layer pattern: A = attention only, MMMA = the pipeline's hybrid
    d_model: int = 128
    n_layers: int = 4
    vocab_size: int = 512
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    batch_size: int = 32

    def __post_init__(self):
        name = "GroundedBaseConfig"
        for field in ("n_train", "d_model", "n_layers", "vocab_size", "pretrain_steps", "batch_size"):
            check_int(name, field, getattr(self, field), ge=1)
        check_int(name, "people", self.people, ge=1, le=len(grounded_qa.NAMES))
        if not (isinstance(self.layout, str) and self.layout and set(self.layout) <= {"M", "A"}):
            fail(name, "layout", "a non-empty string of 'M' (Mamba) and 'A' (attention)", self.layout)
        check_number(name, "pretrain_lr", self.pretrain_lr, gt=0)


QUICK_BASE = dict(n_train=60, vocab_size=384, d_model=32, n_layers=2, pretrain_steps=3, batch_size=4)
"""A seconds-long base for smoke runs (the examples' --quick)."""


def cache_directory(cfg: GroundedBaseConfig, seed: int, cache_dir) -> Path | None:
    fields = {"task": "grounded_qa", "seed": seed, **asdict(cfg)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"grounded_qa-seed{seed}-{digest}" if cache_dir else None


def cached_grounded_base(cfg: GroundedBaseConfig, seed: int, train, cache_dir=None, device: str = "cpu",
                         log_every: int = 20, print_fn=print) -> tuple[ElleciLM, Tokenizer]:
    """Tokenizer + base pretrained on `train`'s pretraining texts, built once per settings and seed."""
    directory = cache_directory(cfg, seed, cache_dir)
    if directory is not None and (directory / "cache.json").is_file():
        print_fn(f"base: loaded from {directory}")
        return ElleciLM.from_pretrained(directory).to(device), Tokenizer.load(directory)
    texts = grounded_qa.pretraining_texts(train, seed=seed)
    tok = build_tokenizer(texts, cfg.vocab_size)
    torch.manual_seed(seed)
    config = ElleciConfig.from_name("small", d_model=cfg.d_model, n_layers=cfg.n_layers, vocab_size=tok.vocab_size,
                                    layer_pattern=cfg.layout, n_heads=4, kv_lora_rank=32, mamba_heads=4)
    model = ElleciLM(config).to(device)
    rows = [(ids, ids) for ids in (tok.encode(t) + [tok.eos_id] for t in texts)]
    train_loop(model, sample_batches(rows, cfg.batch_size, seed, sft_collate(tok.pad_id)), sft_step,
               steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, log_every=log_every, print_fn=print_fn)
    if directory is not None:
        model.save_pretrained(directory, tokenizer=tok)
        write_json_atomic(directory / "cache.json", {"task": "grounded_qa", "seed": seed, **asdict(cfg)})
        print_fn(f"base: saved to {directory}")
    return model, tok
