"""Models and tokenizers for the `elleci` command, from any of the forms a path can take.

    kind = model_kind("runs/sft/final")        # "model" | "adapter" | "original" | "preset"  (nothing loaded)
    config = model_config(path)                 # the ElleciConfig, read without the weights (for --plan)
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    tok = load_tokenizer(path, tokenizer="")    # the saved one, or the given file/directory

A path is a saved elleci directory (config.json + model.safetensors), an adapter directory written by a
LoRA run (adapter_config.json naming its base in `base_model_name_or_path`: the base is loaded — itself any
of these forms — and the adapter merged into it, or kept as adapters with `merge_adapters=False`), an
original `.pth`, or a preset name (a fresh model initialised from `seed`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from elleci.model import PRESETS, ElleciConfig, ElleciLM, Tokenizer, load_original
from elleci.model.lora import LoraConfig, apply_lora, load_adapter, lora_modules, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
BASE_SEED_KEY = "elleci_base_seed"


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"[model] device {device!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"[model] device {device!r}: CUDA is not available on this machine (use auto or cpu)")
    return d


def model_kind(path: str) -> str:
    """What `path` names, without loading it; ValueError (naming the path) if it is none of the forms."""
    p = Path(path)
    if p.is_dir():
        if (p / ADAPTER_CONFIG).is_file():
            return "adapter"
        if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            return "model"
        raise ValueError(f"{path}: a directory without config.json + model.safetensors (a model) or "
                         f"{ADAPTER_CONFIG} (an adapter)")
    if p.is_file():
        return "original"
    if path in PRESETS:
        return "preset"
    raise ValueError(f"{path}: no such file or directory, and not a preset name; expected a saved elleci "
                     f"directory, an adapter directory, an original .pth, or one of {sorted(PRESETS)}")


def adapter_meta(path) -> dict:
    meta = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if not meta.get("base_model_name_or_path"):
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path); load its base "
                         "yourself and apply it with elleci.model.lora.load_adapter")
    return meta


def model_config(path: str, n_heads: int = 0) -> ElleciConfig:
    """The architecture behind `path`, reading only small files (a .pth is opened memory-mapped)."""
    kind = model_kind(path)
    if kind == "preset":
        return ElleciConfig.from_name(path)
    if kind == "model":
        return ElleciConfig.from_json(Path(path) / "config.json")
    if kind == "adapter":
        return model_config(adapter_meta(path)["base_model_name_or_path"], n_heads)
    from elleci.model.checkpoint import clean_original_state_dict, infer_original_config
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return infer_original_config(clean_original_state_dict(state), n_heads=n_heads or None)


def adapter_chain(path: str) -> list[str]:
    """[base, adapter_1, ..., path]: the bases an adapter directory rests on, innermost first."""
    chain = [path]
    while model_kind(chain[0]) == "adapter":
        chain.insert(0, adapter_meta(chain[0])["base_model_name_or_path"])
        if len(chain) > 32:
            raise ValueError(f"{path}: adapter bases form a cycle")
    return chain


def load_model(path: str, *, dtype: torch.dtype | None = None, device=None, seed: int = 0, n_heads: int = 0,
               merge_adapters: bool = True) -> ElleciLM:
    """An ElleciLM from any form of `path` (module docstring), on `device`, in `dtype`."""
    chain = adapter_chain(path)
    base, kind = chain[0], model_kind(chain[0])
    if kind == "preset":
        model = _fresh(base, _base_seed(chain, seed))
        if dtype is not None:
            model = model.to(dtype)
    elif kind == "model":
        model = ElleciLM.from_pretrained(base, dtype=dtype)
    else:
        model = load_original(base, n_heads=n_heads or None, dtype=dtype)
    if device is not None:
        model = model.to(device)
    for i, adapter in enumerate(chain[1:]):
        load_adapter(model, adapter)
        last = i == len(chain) - 2
        if merge_adapters or not last:
            try:
                merge_lora(model, unload=True)
            except ValueError as e:
                raise ValueError(f"{adapter}: {e}") from None
    if not lora_modules(model):                  # merged adapters leave frozen weights behind: a full model trains
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[-1] != "importance_threshold")
    return model


def _base_seed(chain: list[str], seed: int) -> int:
    """A preset base recorded by an adapter was initialised from the seed stored beside it."""
    if len(chain) > 1:
        return int(adapter_meta(chain[1]).get(BASE_SEED_KEY, seed))
    return seed


def _fresh(name: str, seed: int) -> ElleciLM:
    """The preset initialised from `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ElleciLM(ElleciConfig.from_name(name))


def find_tokenizer(path: str, tokenizer: str = "") -> str:
    """The tokenizer to use: `tokenizer` if given, else the first saved beside `path` or its bases."""
    if tokenizer:
        if not Path(tokenizer).exists():
            raise ValueError(f"[model] tokenizer {tokenizer}: no such file or directory")
        return tokenizer
    for p in reversed(adapter_chain(path)):
        if Path(p).is_dir() and any((Path(p) / f).is_file() for f in TOKENIZER_FILES):
            return p
    raise ValueError(f"{path} has no tokenizer saved with it: set [model] tokenizer (a tokenizer.model / "
                     "tokenizer.json file or a directory holding one)")


def load_tokenizer(path: str, tokenizer: str = "") -> Tokenizer:
    return Tokenizer.load(find_tokenizer(path, tokenizer))


def check_tokenizer_fits(tok: Tokenizer, config: ElleciConfig, where: str) -> None:
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                         f"{config.vocab_size}: they do not belong together")


def add_lora(model, lora) -> bool:
    """Apply the [lora] section (None or r = 0: full fine-tuning). Returns whether adapters were added."""
    if lora is None or lora.r == 0:
        return False
    apply_lora(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), use_rslora=lora.use_rslora))
    return True


def base_reference(path: str) -> str:
    """How an adapter written by this run names its base: an absolute path, or the preset name."""
    return path if model_kind(path) == "preset" else str(Path(path).resolve())
