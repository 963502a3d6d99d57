"""`elleci generate MODEL`: answer a prompt, or chat interactively, with the ChatML template.

    elleci generate runs/tiny/sft/final --prompt "Qual è la capitale della Francia?"
    elleci generate runs/v1-dpo/final                      # interactive chat; /reset clears, an empty line quits
    elleci generate runs/v1 --adapter runs/v1-dpo/final    # a model plus an adapter
    elleci generate elleci_v1_final.pth --tokenizer tokenizer.json --raw --prompt "C'era una volta"

MODEL is a model directory, an adapter directory (its base is loaded and the adapter applied, unmerged),
an original .pth or a preset. Chat mode stops each answer at <|im_end|> (the end of the assistant's turn);
--raw continues the text as is and stops at <|endoftext|>. The device is CUDA when available.
"""
from __future__ import annotations

import argparse
import sys

import torch

from elleci.model.lora import load_adapter

from .loading import load_model, load_tokenizer, resolve_device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elleci generate", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model or adapter directory, original .pth, or preset name")
    p.add_argument("--adapter", default="", help="a LoRA adapter directory to apply on top (default: none)")
    p.add_argument("--tokenizer", default="", help="tokenizer file or directory (default: the one saved with "
                                                   "the model)")
    p.add_argument("--prompt", default=None, help="answer this and exit (default: interactive chat)")
    p.add_argument("--system", default="", help="a system message for chat mode (default: none)")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: 0.9; 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="", help="default: bfloat16 on CUDA, "
                                                                               "float32 on CPU")
    return p


def stop_ids(tok, raw: bool) -> list[int]:
    """Chat: <|im_end|> ends the turn (and <|endoftext|> anything); raw text: <|endoftext|>."""
    return [tok.eos_id] if raw else [tok.im_end_id, tok.eos_id]


def reply(model, tok, ids: list[int], args, generator) -> str:
    kw = {"top_p": args.top_p} if 0 < args.top_p < 1 else {}
    if args.top_k:
        kw["top_k"] = args.top_k
    out = model.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         eos_token_id=stop_ids(tok, args.raw), generator=generator, **kw)
    new = out[0, len(ids):].tolist()
    stops = set(stop_ids(tok, args.raw))
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tok.decode([t for t in new[:cut] if t < tok.vocab_size], skip_special_tokens=True)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else None)
    tok = load_tokenizer(args.model, args.tokenizer)
    model = load_model(args.model, dtype=dtype, device=device, merge_adapters=False)
    if args.adapter:
        load_adapter(model, args.adapter)
        model.to(device)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.prompt is not None:
        ids = tok.encode(args.prompt) if args.raw else tok.apply_chat_template(
            _messages(args.system, [{"role": "user", "content": args.prompt}]), add_generation_prompt=True)
        print(reply(model, tok, ids, args, generator))
        return 0
    history: list[dict] = []
    print(f"chatting with {args.model}{' + ' + args.adapter if args.adapter else ''} on {device} "
          "(/reset clears the conversation, an empty line or Ctrl-D quits)", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        if args.raw:
            print(reply(model, tok, tok.encode(line), args, generator))
            continue
        history.append({"role": "user", "content": line})
        answer = reply(model, tok, tok.apply_chat_template(_messages(args.system, history),
                                                           add_generation_prompt=True), args, generator)
        history.append({"role": "assistant", "content": answer})
        print(answer)
    return 0


def _messages(system: str, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns
