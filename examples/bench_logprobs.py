"""Benchmark of per-token log-probs fused with the lm_head: elleci's Triton kernel against its peers.

    python examples/bench_logprobs.py                                  # CUDA: T=8192, D=2048, V=32128, bf16
    python examples/bench_logprobs.py --tokens 2048 --reps 50 --dtype float32
    python examples/bench_logprobs.py --tiny                           # CPU smoke run (tiny shapes, wall clock)

Methods, all returning float32 log p(label) per token with gradients to hidden and weight:
  (a) elleci Triton kernel (`token_logprobs`, backend "triton"),
  (b) unfused PyTorch: logits = h @ W^T in the input dtype -> float -> log_softmax -> gather,
  (c) elleci's chunked pure-PyTorch reference (`token_logprobs_ref`, 1024 tokens a chunk),
  (d) Liger's LigerFusedLinearCrossEntropyLoss(reduction="none") when `liger_kernel` imports (grad_weight
      accumulated in the weight dtype, its default),
  (e) the three lm_head GEMMs alone (h @ W^T, G @ W, G^T @ h with a ready-made G), the floor.
Forward is timed under no_grad, forward+backward with a random upstream gradient; medians of --reps runs
with CUDA events after warm-up. "extra MiB" is the peak allocated during forward+backward minus what was
allocated before it (inputs); it includes the gradients themselves (T*D + V*D elements). Prints a markdown
table headed by the GPU name.

    python examples/bench_logprobs.py --dpo-step                       # CUDA: peak memory of one DPO step

`--dpo-step` measures instead the peak memory of one DPO step of `elleci-v1` (bf16 weights) with LoRA
(r=16 on the default targets), one pair of 1024-token sequences, gradient checkpointing and precomputed
reference log-probs (the path for a 12 GB card). With --tiny it runs the same code on the tiny preset, on CPU.
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import torch

from elleci.bench import extra_mib, median_ms
from elleci.kernels import use_backend
from elleci.kernels.dispatch import triton_available
from elleci.kernels.logprobs import token_logprobs, token_logprobs_ref


def unfused(h, w, y):
    logits = (h @ w.t()).float()
    return torch.where(y != -100, logits.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None])[:, 0], 0.0)


def elleci_triton(h, w, y):
    with use_backend("triton"):
        return token_logprobs(h, w, y)


def liger_method():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none")
    return lambda h, w, y: -loss(w, h, y)


def dpo_step_memory(device: str, tiny: bool, seq_len: int = 1024) -> None:
    """Peak memory of one DPO forward+backward+AdamW step: elleci-v1 + LoRA r=16, one pair, checkpointing."""
    from elleci.algos import dpo_loss
    from elleci.algos.preference import pairwise_step
    from elleci.model import ElleciConfig, ElleciLM
    from elleci.model.lora import LoraConfig, apply_lora
    from elleci.train import make_optimizer

    preset, seq_len = ("tiny", 32) if tiny else ("elleci-v1", seq_len)
    config = ElleciConfig.from_name(preset, gradient_checkpointing=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = ElleciLM(config, dtype=dtype)
    apply_lora(model, LoraConfig(r=16, lora_alpha=16))
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(4, config.vocab_size, (2, 1, seq_len), device=device)
    labels = ids.clone()
    labels[..., : seq_len // 4] = -100                           # a quarter prompt, the rest response
    batch = {"chosen_ids": ids[0], "chosen_labels": labels[0], "rejected_ids": ids[1], "rejected_labels": labels[1],
             "ref_chosen_logps": torch.tensor([-900.0]), "ref_rejected_logps": torch.tensor([-905.0]),
             "pad_token_id": 1}
    step = pairwise_step(dpo_loss, reference="precomputed", beta=0.1)
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):                                             # the second step has the AdamW state
        loss, _ = step(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{torch.cuda.get_device_name()}: one DPO step of {preset} ({model.num_parameters() / 1e9:.3f}B, bf16) "
              f"+ LoRA r=16 ({n_lora / 1e6:.1f}M trainable), 1 pair x {seq_len} tokens, gradient checkpointing, "
              f"precomputed reference: peak {peak:.2f} GiB allocated")
    else:
        print(f"CPU smoke run: one DPO step of {preset} + LoRA r=16 ({n_lora} trainable), loss {loss.item():.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (32 x 16 x 300); runs on CPU")
    ap.add_argument("--dpo-step", action="store_true", help="peak memory of one elleci-v1 + LoRA DPO step")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dpo_step:
        if device == "cpu" and not args.tiny:
            raise SystemExit("--dpo-step needs a CUDA GPU; add --tiny for a CPU smoke run")
        return dpo_step_memory(device, args.tiny)
    if device == "cpu" and not args.tiny:
        raise SystemExit("bench_logprobs needs a CUDA GPU for the real shapes; use --tiny for a CPU smoke run")
    if args.tiny:
        args.tokens, args.d, args.vocab = 32, 16, 300
    T, D, V, dtype = args.tokens, args.d, args.vocab, getattr(torch, args.dtype)

    torch.manual_seed(0)
    h = torch.randn(T, D, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, device=device, dtype=dtype) / D**0.5).requires_grad_()
    y = torch.randint(0, V, (T,), device=device)
    g = torch.randn(T, device=device)
    time_ms = partial(median_ms, device=device, reps=args.reps, warmup=1 if args.tiny else 3)

    methods = {"unfused PyTorch": unfused, "chunked reference": token_logprobs_ref}
    if triton_available() and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        methods = {"elleci Triton (fused)": elleci_triton, **methods}
    if device == "cuda" and liger_method() is not None:
        methods["Liger FLCE (reduction=none)"] = liger_method()

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, T={T}, D={D}, V={V}, {args.dtype}, median of {args.reps}\n")
    print("| method | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | x GEMM floor | extra MiB (fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    flops = 6 * T * D * V

    with torch.no_grad():                        # (e) the floor: three GEMMs, operands ready-made
        logits = torch.empty(T, V, device=device, dtype=dtype)
        G, dh, dw = torch.randn_like(logits), torch.empty_like(h), torch.empty_like(w)
        floor_fwd = time_ms(lambda: torch.mm(h, w.t(), out=logits))
        floor = time_ms(lambda: (torch.mm(h, w.t(), out=logits), torch.mm(G, w, out=dh), torch.mm(G.t(), h, out=dw)))
        del logits, G, dh, dw

    rows = []
    for label, fn in methods.items():
        def step():
            h.grad = w.grad = None
            fn(h, w, y).backward(g)

        def forward():
            with torch.no_grad():
                fn(h, w, y)
        fwd, both = time_ms(forward), time_ms(step)
        mem = extra_mib(device, step)
        h.grad = w.grad = None
        rows.append((label, fwd, both, mem))
    rows.append(("lm_head GEMMs alone (floor)", floor_fwd, floor, float("nan")))
    for label, fwd, both, mem in rows:
        mem_s = "-" if mem != mem else f"{mem:.0f}"
        print(f"| {label} | {fwd:.3f} | {both:.3f} | {flops / both / 1e9:.1f} | {both / floor:.2f} | {mem_s} |")


if __name__ == "__main__":
    main()
