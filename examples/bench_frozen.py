"""The frozen ternary base on a CPU, side by side with transformers + PEFT: a LoRA-DPO step, decoding, memory.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python examples/bench_frozen.py --tokens 512 1024 --rounds 3
    python examples/bench_frozen.py --decode --rounds 3                   # decode tok/s at batch 1 + resident size
    python examples/bench_frozen.py --preset tiny --hf-tiny --tokens 32 --rounds 1   # smoke run (seconds)
    python examples/bench_frozen.py --blocks --tokens 512 --frozen-dir DIR      # seconds per block kind / part

OMP_WAIT_POLICY=PASSIVE: on a CPU shared with other work, OpenMP threads that spin at every barrier made
2-thread decoding 4x and a 16-token prefill 15x slower than 1 thread (measured on the 2-core machine of the
README); passive waiting removes that, for both stacks alike. Wall and CPU (process) seconds are both given.

Each measurement runs in its own process (`--one STACK ...`, printing one JSON line), so every peak RSS
(VmHWM: model build included) is that configuration's alone; the stacks alternate round by round and the
table gives min and median over rounds.

DPO step (`--tokens T`): one pair, T tokens per side (the first 32 are the prompt, not scored), the
reference log-probs precomputed (constants), β 0.1, AdamW lr 1e-5 on the adapters, gradient checkpointing;
step 1 warms up, step 2 is timed (wall clock) and reported. elleci runs as shipped (no heap trim); `--trim-arm`
adds "elleci-trim", the same run returning the heap's free pages to the OS before every 4th checkpointed block
(`elleci.model.host_memory.TRIM_EVERY = 4`); `--stacks hf-trim` runs transformers + PEFT with that trim.
  elleci:  elleci-v1, random weights, frozen ternary base (the FFN's BitLinear weights packed, W dropped)
           in bf16, loaded with `from_pretrained(--frozen-dir)` (write it once: `--make-frozen DIR`), LoRA
           r 16 α 32 on every linear layer ("all-linear"), chosen and rejected in one [2, T] forward
           (`sequence_logprobs`, fused log-prob), `dpo_loss`.
  hf:      transformers LlamaForCausalLM (hidden 2048, 24 layers, MLP 5632, 16 heads, vocab 32128:
           1.365B parameters) in bf16, random weights, PEFT LoRA r 16 α 32 on q/k/v/o/gate/up/down,
           gradient checkpointing (non-reentrant), [2, T] forward, log-probs as TRL computes them for bf16
           logits (log_softmax per row, gathered), the same DPO loss.
Decoding (`--decode`): greedy, batch 1, prompt 16, tok/s = 16 / (time of 17 new tokens - time of 1),
bf16; "latent" is ElleciLM with its cached Q_w(W), "frozen" after `freeze_ternary`; with `--baseline DIR`
the same latent run on another checkout of elleci (e.g. `git archive <commit> | tar -x -C DIR`) gives
"before". Resident size = bytes of the model's tensors (parameters, buffers, BitLinear weight caches).

transformers and peft are benchmark-only (not elleci dependencies): `pip install transformers peft`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

PROMPT = 32
TRIM_ARM_EVERY = 4           # the trim arms: before every 4th checkpointed block / decoder layer


def vm_hwm_gb() -> float:
    """This process's peak resident set (VmHWM), GB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024 / 1e9


def _pair(T: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 200, (2, T), generator=g)              # chosen, rejected
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels


def _dpo(policy_logps: torch.Tensor) -> torch.Tensor:
    from elleci.algos import dpo_loss
    ref = torch.tensor([-1.0, -2.0]) * policy_logps.shape[0]              # precomputed reference (constants)
    loss, _ = dpo_loss(policy_logps[:1], policy_logps[1:], ref[:1], ref[1:], beta=0.1)
    return loss


def _elleci_model(preset: str, frozen_dir: str | None):
    """The frozen base: loaded from a frozen-ternary checkpoint (the real flow: convert once with
    `python -m elleci.model.convert ... --frozen-ternary`), or built at random and frozen."""
    from elleci.model import ElleciConfig, ElleciLM
    from elleci.model.lora import LoraConfig, apply_lora
    from elleci.model.ternary import freeze_ternary
    torch.manual_seed(0)
    if frozen_dir:
        model = ElleciLM.from_pretrained(frozen_dir, dtype=torch.bfloat16)
        model.config.gradient_checkpointing = True
    else:
        model = freeze_ternary(ElleciLM(ElleciConfig.from_name(preset, gradient_checkpointing=True), dtype=torch.bfloat16))
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model.train()


def _elleci_logps(model, ids, labels):
    from elleci.algos.logprobs import sequence_logprobs
    return sequence_logprobs(model, ids, labels)


def _hf_model(tiny: bool, trim: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    dims = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4, vocab_size=512) \
        if tiny else dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=5632, num_attention_heads=16,
                          vocab_size=32128)
    cfg = LlamaConfig(**dims, num_key_value_heads=dims["num_attention_heads"], max_position_embeddings=4096,
                      tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)                              # built in bf16 directly, as elleci's
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora).train()
    if trim:                                      # elleci's heap trim, on the same layers (checkpointed call)
        from elleci.model.host_memory import trim_host_memory
        def trim_before(module, args):            # (returns None: the layer's inputs stay as they are)
            trim_host_memory()
        for i, layer in enumerate(model.base_model.model.model.layers):
            if i % TRIM_ARM_EVERY == 0:
                layer.register_forward_pre_hook(trim_before)
    return model


def _hf_logps(model, ids, labels):
    """TRL's selective_log_softmax for bf16 logits: log_softmax one row at a time, then gather."""
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    per_row = [torch.log_softmax(row, -1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
               for row, t in zip(logits, target)]
    return (torch.stack(per_row).float() * mask).sum(-1)


def one_step_run(stack: str, T: int, preset: str, hf_tiny: bool, frozen_dir: str | None = None) -> dict:
    t0 = time.perf_counter()
    if stack == "elleci-trim":                                           # the same, with the heap trim
        from elleci.model import host_memory
        host_memory.TRIM_EVERY = TRIM_ARM_EVERY
    model = _elleci_model(preset, frozen_dir) if stack.startswith("elleci") else _hf_model(hf_tiny, stack == "hf-trim")
    rss_model = vm_hwm_gb()
    build = time.perf_counter() - t0
    vocab = 512 if (preset == "tiny" and stack.startswith("elleci")) or (stack.startswith("hf") and hf_tiny) else 32128
    ids, labels = _pair(T, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    logps_fn = _elleci_logps if stack.startswith("elleci") else _hf_logps
    times, cpu = [], []
    for _ in range(2):
        t, c = time.perf_counter(), time.process_time()
        loss = _dpo(logps_fn(model, ids, labels))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return dict(stack=stack, tokens=T, step1_s=times[0], step2_s=times[1], step2_cpu_s=cpu[1], build_s=build,
                peak_rss_gb=vm_hwm_gb(), peak_rss_after_load_gb=rss_model, trainable=sum(p.numel() for p in params),
                loss=float(loss.detach()))


def one_blocks_run(preset: str, frozen_dir: str | None, T: int, repeats: int = 3) -> dict:
    """Best seconds of forward + recompute + backward (each part checkpointed, as in the step) of one block of
    each kind and of its parts, on a random [2, T] bf16 input of the frozen-ternary model with LoRA."""
    from torch.utils.checkpoint import checkpoint

    from elleci.bench import best_seconds
    model = _elleci_model(preset, frozen_dir)
    kinds = {b.kind: b for b in model.blocks}
    bm, ba = kinds["M"], kinds["A"]
    x0 = torch.randn(2, T, model.config.d_model, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pos = torch.arange(T).expand(2, T)
    parts = {"mamba block": lambda h: bm(h), "attention block": lambda h: ba(h, None, pos),
             "mamba mixer": lambda h: bm.attn(bm.norm1(h)), "attention mixer": lambda h: ba.attn(ba.norm1(h), positions=pos),
             "ffn": lambda h: bm.ffn(bm.norm2(h))}

    def step(fn):
        x = x0.clone().requires_grad_(True)
        checkpoint(fn, x, use_reentrant=False).float().pow(2).sum().backward()
    return {name: best_seconds(lambda: step(fn), "cpu", repeats) for name, fn in parts.items()}


def _model_bytes(model) -> int:
    seen, total = set(), 0
    tensors = list(model.state_dict().values()) + [m._weight_cache[2] for m in model.modules()
                                                   if getattr(m, "_weight_cache", None) is not None]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def one_decode_run(variant: str, preset: str) -> dict:
    from elleci.model import ElleciConfig, ElleciLM
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)                              # works on older checkouts too
    try:
        model = ElleciLM(ElleciConfig.from_name(preset)).eval()
    finally:
        torch.set_default_dtype(previous)
    if variant == "frozen":
        from elleci.model.ternary import freeze_ternary
        freeze_ternary(model)
    prompt = torch.randint(5, 500, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(prompt, 2, temperature=0.0)                       # warm-up (fills the weight caches)
        t, c = time.perf_counter(), time.process_time()
        model.generate(prompt, 1, temperature=0.0)
        one, one_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        out = model.generate(prompt, 17, temperature=0.0)
        full, full_cpu = time.perf_counter() - t, time.process_time() - c
    return dict(variant=variant, tok_s=16 / (full - one), s_per_token=(full - one) / 16, prefill_s=one,
                cpu_s_per_token=(full_cpu - one_cpu) / 16,
                resident_gb=_model_bytes(model) / 1e9, peak_rss_gb=vm_hwm_gb(), tokens=out[0, 16:].tolist())


def _spawn(args: list[str], pythonpath: str, tries: int = 2) -> dict:
    """Run one measurement in a fresh process; a failed one (e.g. killed when the machine ran short of
    memory: other jobs share it) is retried once, and reported if it fails again."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    for attempt in range(tries):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                             env=env)
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# {args[-3:]} failed (return code {out.returncode}, attempt {attempt + 1}): {out.stderr[-300:]!r}",
              flush=True)
    raise RuntimeError(f"{args} failed {tries} times")


def _stats(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="elleci-v1")
    ap.add_argument("--hf-tiny", action="store_true", help="a tiny Llama instead of the 1.36B one (smoke runs)")
    ap.add_argument("--frozen-dir", default=None,
                    help="load elleci's frozen base from this frozen-ternary checkpoint (else: build at random, freeze)")
    ap.add_argument("--decode", action="store_true", help="decode tok/s and resident size instead of the DPO step")
    ap.add_argument("--baseline", default=None, help="another elleci checkout: decode 'before' (latent) with it")
    ap.add_argument("--json", default=None, help="append every measurement to this JSONL file")
    ap.add_argument("--make-frozen", default=None, help="write a random frozen-ternary --preset checkpoint here, exit")
    ap.add_argument("--trim-arm", action="store_true",
                    help=f"also run elleci with host_memory.TRIM_EVERY = {TRIM_ARM_EVERY} ('elleci-trim'): the heap trim's effect")
    ap.add_argument("--stacks", nargs="+", default=None, choices=["elleci", "hf", "elleci-trim", "hf-trim"],
                    help="which stacks to run (default: elleci and hf, plus elleci-trim with --trim-arm; "
                         "--stacks replaces that choice); "
                         "hf-trim: transformers + PEFT with elleci's heap trim on every 4th decoder layer")
    ap.add_argument("--blocks", action="store_true",
                    help="seconds per block kind and part (forward + recompute + backward) at the first --tokens")
    ap.add_argument("--one", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_frozen:
        from elleci.model import ElleciConfig, ElleciLM
        from elleci.model.ternary import freeze_ternary
        torch.manual_seed(0)
        freeze_ternary(ElleciLM(ElleciConfig.from_name(args.preset), dtype=torch.bfloat16)).save_pretrained(args.make_frozen)
        return
    if args.blocks:
        print(json.dumps({k: round(v, 3) for k, v in one_blocks_run(args.preset, args.frozen_dir, args.tokens[0]).items()}))
        return
    if args.one:                                                         # worker: one measurement, JSON out
        kind, name, *rest = args.one
        res = one_step_run(name, int(rest[0]), args.preset, args.hf_tiny, args.frozen_dir) if kind == "step" else \
            one_decode_run(name, args.preset)
        print(json.dumps(res))
        return
    here = os.environ.get("PYTHONPATH", os.getcwd())
    common = ["--preset", args.preset] + (["--hf-tiny"] if args.hf_tiny else []) + \
        (["--frozen-dir", args.frozen_dir] if args.frozen_dir else [])
    results: dict = {}
    for r in range(args.rounds):
        if args.decode:
            jobs = [("decode", "latent", here), ("decode", "frozen", here)]
            if args.baseline:
                jobs.insert(0, ("decode", "before", args.baseline))
        else:
            stacks = tuple(args.stacks) if args.stacks else ("elleci", "hf") + (("elleci-trim",) if args.trim_arm else ())
            order = stacks if r % 2 == 0 else stacks[::-1]
            jobs = [("step", s, here, T) for T in args.tokens for s in order]
        for job in jobs:
            kind, name, path = job[:3]
            extra = [str(job[3])] if kind == "step" else []
            res = _spawn(common + ["--one", kind, "latent" if name == "before" else name, *extra], path)
            res.update(round=r, name=name)
            print(json.dumps(res), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
            results.setdefault((name, res.get("tokens") if kind == "step" else None), []).append(res)
    print()
    if args.decode:
        print("| variant | decode tok/s (min / median) | wall s per token (min / median) | CPU s per token (min / median) "
              "| resident GB | peak RSS GB |")
        print("|---|---|---|---|---|---|")
        for (name, _), rs in results.items():
            print(f"| {name} | {_stats([x['tok_s'] for x in rs])} | {_stats([x['s_per_token'] for x in rs])} | "
                  f"{_stats([x['cpu_s_per_token'] for x in rs])} | {rs[0]['resident_gb']:.2f} | "
                  f"{_stats([x['peak_rss_gb'] for x in rs])} |")
        return
    print("| tokens per side | stack | step 2 wall s (min / median) | step 2 CPU s (min / median) | peak RSS GB (min / median) |")
    print("|---|---|---|---|---|")
    for T in args.tokens:
        for name in ("elleci", "hf", "elleci-trim", "hf-trim"):
            if (name, T) not in results:
                continue
            rs = results[(name, T)]
            print(f"| {T} | {name} | {_stats([x['step2_s'] for x in rs])} | {_stats([x['step2_cpu_s'] for x in rs])} | "
                  f"{_stats([x['peak_rss_gb'] for x in rs])} |")
        if ("elleci", T) not in results or ("hf", T) not in results:
            continue
        e, h = results[("elleci", T)], results[("hf", T)]
        med = lambda rs, k: statistics.median(x[k] for x in rs)                     # noqa: E731
        print(f"| {T} | ratio elleci / hf (medians) | {med(e, 'step2_s') / med(h, 'step2_s'):.2f}x | "
              f"{med(e, 'step2_cpu_s') / med(h, 'step2_cpu_s'):.2f}x | {med(e, 'peak_rss_gb') / med(h, 'peak_rss_gb'):.2f}x |")


if __name__ == "__main__":
    main()
