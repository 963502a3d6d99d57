"""A merge as a small JSON file, and the command line: `python -m elleci.algos.merging CONFIG.json`.

    {"method": "ties", "base": "runs/base", "models": ["runs/it", "runs/en"], "params": {"density": 0.2},
     "output": "runs/merged"}

A `MergeConfig` validates itself when constructed (errors name the key and what it allows);
`load_merge_config` reads one from a file, `run_merge` loads the saved models, computes or loads Grams for
RegMean, merges with `elleci.algos.merging.merge.merge` and writes the result (`save_pretrained`, the first
model's tokenizer, and the config beside it), so a merge is reproducible.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from elleci._io import write_json_atomic
from elleci.algos.merging.merge import METHODS, StateDict, Tensor, merge
from elleci.algos.merging.regmean import (GRAM_MODES, as_state_dict, collect_grams, load_grams, read_gram_texts, save_grams,
                      text_batches)

__all__ = ["MergeConfig", "load_merge_config", "run_merge", "main"]

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
GRAM_DATA_KEYS = {"files", "grams", "format", "batch_size", "max_length", "max_examples", "mode", "mask_padding",
                  "save_grams", "device", "dtype"}
RUNTIME_FIELDS = {"chunk_size", "dropout", "init_std", "gradient_checkpointing", "autocast"}  # may differ


@dataclasses.dataclass
class MergeConfig:
    """A merge job, usually read from JSON by `load_merge_config`. Paths are relative to the working directory.

        {"method": "ties", "base": "runs/base", "models": ["runs/it", "runs/en"], "weights": [1.0, 0.5],
         "params": {"density": 0.2, "lam": 1.0}, "output": "runs/merged"}

        {"method": "regmean", "models": ["runs/it", "runs/en"], "params": {"alpha": 0.9},
         "gram_data": {"files": ["it.jsonl", "en.jsonl"], "format": "auto", "max_examples": 256,
                       "batch_size": 8, "max_length": 512, "mode": "mean"},
         "output": "runs/merged"}

    method: a key of METHODS. models: saved ElleciLM directories (slerp: exactly 2; t=0 is models[0]).
    base: required by task_arithmetic / ties / dare_*, refused by the others. weights: one per model
    (regmean: the coefficients c_i). params: the method's keyword arguments (METHODS lists them).
    gram_data (regmean only): "files", one JSONL/.txt per model, read by `read_gram_texts` ("format") and
    tokenised with that model's tokenizer; or "grams", one safetensors file per model (`save_grams`).
    Optional: max_examples (first N texts), batch_size (8), max_length (512), mode ("mean"|"sum"),
    mask_padding (true), save_grams (one path per model to write the computed Grams to), device ("cpu";
    e.g. "cuda": each model visits it in turn for its forward passes), dtype ("float64"; "float32" halves
    the Grams' memory, Σ in² per model: about 6 GB in float32 for elleci-v1).
    """
    method: str
    models: list[str]
    output: str
    base: str | None = None
    weights: list[float] | None = None
    params: dict = dataclasses.field(default_factory=dict)
    gram_data: dict | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "MergeConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"a merge config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown config key(s) {sorted(set(d) - known)}; known: {sorted(known)}")
        missing = [k for k in ("method", "models", "output") if k not in d]
        if missing:
            raise ValueError(f"missing required key(s) {missing}")
        return cls(**d)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; expected one of {sorted(METHODS)}")
        needs_base, allowed, required = METHODS[self.method]
        if not isinstance(self.models, list) or not self.models or not all(isinstance(m, str) for m in self.models):
            raise ValueError(f"'models' must be a non-empty list of model directories, got {self.models!r}")
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"'output' must be a directory path (a non-empty string), got {self.output!r}")
        if self.base is not None and not isinstance(self.base, str):
            raise ValueError(f"'base' must be a model directory (a string) or absent, got {self.base!r}")
        if self.method == "slerp" and (len(self.models) != 2 or self.weights is not None):
            raise ValueError(f"slerp merges exactly 2 models (t in params, no weights), got {len(self.models)}")
        if needs_base and self.base is None:
            raise ValueError(f"method {self.method!r} needs a 'base' model (task vectors are θ_i − θ_base)")
        if not needs_base and self.base is not None:
            raise ValueError(f"method {self.method!r} does not use a 'base' model; remove it")
        if self.weights is not None and (not isinstance(self.weights, list) or len(self.weights) != len(self.models)
                                         or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                    for w in self.weights)):
            raise ValueError(f"'weights' must be a list with one number per model ({len(self.models)}), "
                             f"got {self.weights!r}")
        if not isinstance(self.params, dict) or set(self.params) - allowed or required - set(self.params):
            raise ValueError(f"params for {self.method!r}: allowed {sorted(allowed)}, required {sorted(required)}; "
                             f"got {sorted(self.params) if isinstance(self.params, dict) else self.params!r}")
        if (self.method == "regmean") != (self.gram_data is not None):
            raise ValueError("'gram_data' is required by regmean and used by no other method")
        if self.gram_data is not None:
            self._validate_gram_data()

    def _validate_gram_data(self) -> None:
        g, n = self.gram_data, len(self.models)
        if not isinstance(g, dict) or set(g) - GRAM_DATA_KEYS:
            raise ValueError(f"gram_data must be an object with keys from {sorted(GRAM_DATA_KEYS)}, got {g!r}")
        if ("files" in g) == ("grams" in g):
            raise ValueError("gram_data needs exactly one of 'files' (text/SFT data per model) or 'grams' "
                             "(precomputed safetensors per model)")
        for key in ("files", "grams", "save_grams"):
            if key in g and (not isinstance(g[key], list) or len(g[key]) != n):
                raise ValueError(f"gram_data.{key} must list one path per model ({n}), got {g[key]!r}")
        if g.get("mode", "mean") not in GRAM_MODES:
            raise ValueError(f"gram_data.mode must be one of {GRAM_MODES}, got {g['mode']!r}")
        if g.get("dtype", "float64") not in ("float32", "float64"):
            raise ValueError(f"gram_data.dtype must be 'float32' or 'float64', got {g['dtype']!r}")


def load_merge_config(path) -> MergeConfig:
    """Read and validate a JSON merge config; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    try:
        return MergeConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _load_tokenizer(directory):
    from elleci.model import Tokenizer
    return Tokenizer.load(directory) if any((Path(directory) / f).is_file() for f in TOKENIZER_FILES) else None


def _grams_for(models: list, cfg: MergeConfig) -> list[dict[str, Tensor]]:
    g = cfg.gram_data
    if "grams" in g:
        return [load_grams(p) for p in g["grams"]]
    out = []
    for i, (model, path) in enumerate(zip(models, g["files"])):
        tok = _load_tokenizer(cfg.models[i])
        if tok is None:
            raise ValueError(f"{cfg.models[i]}: no tokenizer saved with the model; needed to encode {path}")
        texts = read_gram_texts(path, g.get("format", "auto"), tok)[: g.get("max_examples")]
        batches = text_batches(texts, tok, g.get("batch_size", 8), g.get("max_length", 512))
        device = torch.device(g.get("device", "cpu"))
        batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]
        grams = collect_grams(model.to(device), batches, mode=g.get("mode", "mean"),
                              mask_padding=g.get("mask_padding", True), dtype=getattr(torch, g.get("dtype", "float64")))
        model.to("cpu")
        grams = {k: v.cpu() for k, v in grams.items()}
        if "save_grams" in g:
            save_grams(grams, g["save_grams"][i])
        out.append(grams)
    return out


def run_merge(config: MergeConfig | Mapping | str | Path) -> StateDict:
    """Load the models, merge, and write `output` (config.json + model.safetensors, each atomically, plus
    the first model's tokenizer and the merge config as merge_config.json). Returns the merged state dict."""
    from elleci.model import ElleciLM
    from elleci.model.checkpoint import model_from_state_dict
    cfg = config if isinstance(config, MergeConfig) else (
        MergeConfig.from_dict(config) if isinstance(config, Mapping) else load_merge_config(config))
    models = [ElleciLM.from_pretrained(p) for p in cfg.models]
    base = ElleciLM.from_pretrained(cfg.base) if cfg.base is not None else None
    arch = models[0].config.to_dict()
    for path, m in zip(cfg.models[1:] + [cfg.base], models[1:] + [base]):
        diff = sorted(k for k, v in m.config.to_dict().items() if arch[k] != v and k not in RUNTIME_FIELDS) if m else []
        if diff:
            raise ValueError(f"{path}: architecture differs from {cfg.models[0]} in {diff}; cannot merge")
    grams = _grams_for(models, cfg) if cfg.method == "regmean" else None
    sds = [as_state_dict(m) for m in models]
    merged = merge(cfg.method, sds, base=as_state_dict(base) if base is not None else None,
                   weights=cfg.weights, grams=grams, **cfg.params)
    out = model_from_state_dict(models[0].config, merged, source="merged state dict")
    out.save_pretrained(cfg.output, tokenizer=_load_tokenizer(cfg.models[0]))
    write_json_atomic(Path(cfg.output) / "merge_config.json", dataclasses.asdict(cfg))
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elleci.algos.merging", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="merge config JSON (see elleci.algos.merging.merge_config.MergeConfig)")
    try:
        run_merge(cfg := load_merge_config(parser.parse_args(argv).config))
    except (ValueError, FileNotFoundError) as e:            # a bad config or input: one line, exit status 2
        parser.error(str(e))
    print(f"merged {len(cfg.models)} models with {cfg.method} -> {cfg.output}")

