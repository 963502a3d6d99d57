"""Convert an original Elleci checkpoint to elleci's format.

    python -m elleci.model.convert elleci_v1_final.pth out/elleci-v1 [--n-heads 16] [--dtype bfloat16]
                                   [--tokenizer path/to/tokenizer.json] [--frozen-ternary]

Reads the `.pth` with `weights_only=True`, infers the config from the shapes (see
`elleci.model.checkpoint.load_original`) and writes `config.json` + `model.safetensors` (+ tokenizer).
`--frozen-ternary` stores the BitLinear weights as their packed ternary codes + γ (`elleci.model.ternary`):
a frozen base for LoRA / evaluation, 1.30 GB instead of 2.75 GB for elleci-v1 in bf16.
"""
from __future__ import annotations

import argparse

import torch

from .checkpoint import load_original


def check_tokenizer_fits(tokenizer, vocab_size: int, source) -> None:
    """Refuse a tokenizer with ids the model has no embedding for (the first generate would fail)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {source} has {tokenizer.vocab_size:,} ids but the model's vocabulary has "
                         f"{vocab_size:,} (ids 0..{vocab_size - 1}): it is not this model's tokenizer; nothing "
                         "was written")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m elleci.model.convert", description=__doc__.splitlines()[0])
    ap.add_argument("input", help="state dict saved by the original code (torch.save(model.state_dict()))")
    ap.add_argument("output", help="directory to write config.json + model.safetensors into")
    ap.add_argument("--n-heads", type=int, default=None, help="MLA heads (default: the original's rule for d_model)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="store weights in this dtype (default: as in the input)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model to save beside the weights")
    ap.add_argument("--frozen-ternary", action="store_true",
                    help="store the BitLinear weights packed (2-bit codes + scale): a frozen base, W is dropped")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_original(args.input, n_heads=args.n_heads, dtype=dtype)
    if args.frozen_ternary:
        from .ternary import freeze_ternary
        freeze_ternary(model)
    tok = None
    if args.tokenizer:
        from .tokenizer import Tokenizer
        tok = Tokenizer.load(args.tokenizer)
        check_tokenizer_fits(tok, model.config.vocab_size, args.tokenizer)
    model.save_pretrained(args.output, tokenizer=tok)
    c = model.config
    print(f"wrote {args.output}: {model.num_parameters():,} parameters, d_model {c.d_model}, "
          f"{c.n_layers} layers, pattern {c.layer_pattern}, MLA heads {c.n_heads}, "
          f"gates mamba={c.mamba_input_gate} mla={c.mla_latent_gate}")


if __name__ == "__main__":
    main()
