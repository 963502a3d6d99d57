"""Load what an evaluation reads: a model (saved directory, original `.pth`, + optional LoRA adapter) and
its tokenizer.

    model = load_model("out/sft", adapter="out/dpo/adapter", dtype="bfloat16", device="cuda")
    tok = load_tokenizer("out/sft")                 # a directory with tokenizer.model / tokenizer.json, or the file
    model = load_model("elleci_v1_final.pth")       # the original checkpoint (give its tokenizer.json separately)

A directory is read with `ElleciLM.from_pretrained` (config.json + model.safetensors), a file with
`elleci.model.load_original` (weights-only). An adapter directory is what `save_adapter` writes
(adapter_config.json + adapter_model.safetensors); it is loaded with `load_adapter` and left unmerged.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import ElleciLM, Tokenizer, load_original
from ..model.lora import load_adapter

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from its name ("bfloat16", "bf16", "float32", ...); None / "auto" keeps the checkpoint's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path, *, adapter=None, dtype=None, device=None) -> ElleciLM:
    """An ElleciLM in eval mode on `device` (default: cuda when available): a directory written by
    `save_pretrained` or an original `.pth` state dict, with the LoRA adapter directory `adapter` on top."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (a save_pretrained directory or an original .pth)")
    dt = parse_dtype(dtype)
    model = ElleciLM.from_pretrained(path, dtype=dt) if path.is_dir() else load_original(path, dtype=dt)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.to(device or default_device()).eval()


def load_tokenizer(path) -> Tokenizer:
    """`Tokenizer.load(path)` with an error that says what to pass when `path` holds no tokenizer."""
    path = Path(path)
    try:
        return Tokenizer.load(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no tokenizer at {path} ({e}); pass tokenizer=DIR_OR_FILE (tokenizer.model or "
                                "tokenizer.json; the original checkpoint's is its tokenizer.json)") from None
