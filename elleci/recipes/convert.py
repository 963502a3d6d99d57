"""`elleci convert IN OUT`: an original Elleci checkpoint (or a preset) -> an elleci model directory.

    elleci convert elleci_v1_final.pth runs/elleci-v1 --tokenizer tokenizer.json [--dtype bfloat16]
    elleci convert tiny runs/tiny/base --tokenizer configs/tiny/tokenizer.model       # a fresh tiny model

IN is a `.pth` state dict saved by the original code (read with weights_only=True; the config is inferred
from the shapes, see `elleci.model.load_original`) or a preset name (tiny, small, elleci-v1, elleci-v2),
which writes a freshly initialised model (from --seed) to try the pipeline on. OUT gets config.json +
model.safetensors (+ the tokenizer), published as one directory.
"""
from __future__ import annotations

import argparse

import torch

from elleci.model import PRESETS, Tokenizer, load_original
from elleci.trainer.checkpoints import publish_dir

from .loading import _fresh, check_tokenizer_fits


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elleci convert", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="original .pth, or a preset name: " + ", ".join(sorted(PRESETS)))
    p.add_argument("output", help="directory to write")
    p.add_argument("--tokenizer", default="", help="tokenizer.json / tokenizer.model to save beside the weights "
                                                   "(default: none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="", help="store the weights in this dtype "
                                                                                "(default: as in the input)")
    p.add_argument("--n-heads", type=int, default=0, help="MLA heads of a .pth (0: the original code's rule)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of a preset (default: 0)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None       # read before the (slow) weights
    if args.input in PRESETS:
        model = _fresh(args.input, args.seed)
        model = model.to(dtype) if dtype is not None else model
    else:
        model = load_original(args.input, n_heads=args.n_heads or None, dtype=dtype)
    if tok is not None:
        check_tokenizer_fits(tok, model.config, args.tokenizer)
    with publish_dir(args.output) as tmp:
        model.save_pretrained(tmp, tokenizer=tok)
    c = model.config
    print(f"wrote {args.output}: {model.num_parameters():,} parameters, d_model {c.d_model}, {c.n_layers} layers, "
          f"pattern {c.layer_pattern}, MLA heads {c.n_heads}" + (", with its tokenizer" if tok else ""))
    return 0
