"""The memory plan of a training run, computed before anything is loaded (`elleci <stage> CONFIG --plan`).

    plan = memory_plan(config, dtype=torch.bfloat16, lora=LoraConfig(r=16, ...), sequences=4, length=1024,
                       checkpointing=True)
    print(format_plan(plan))          # one line per component, then the peak

Components (bytes):
    weights          Σ numel · bytes(dtype) of the base model (+ a second copy for a frozen-copy reference)
    lora             the adapter weights, kept in fp32
    gradients        one per trainable parameter, in its dtype
    optimizer        AdamW's two moments per trainable parameter, in its dtype (plain SGD: none)
    bitlinear cache  BitLinear keeps Δ = Q_w(W) − W of every FFN weight (`BitLinear.cache_weights`): W's size
    activations      what autograd saves for the backward pass of ONE micro-batch (sequences × length tokens).
                     Measured, not modelled: the real model is run on fake tensors (`FakeTensorMode`: shapes
                     and dtypes, no storage, nothing loaded) with a saved-tensors hook that adds up the
                     distinct storages saved (parameters excluded). With gradient checkpointing: the input of
                     every block (sequences · length · d_model) plus one block's saved tensors (recomputed in
                     the backward pass). Packed rows ([data] packing, `documents=True`) are traced with a
                     seq_idx: the scan's per-channel chunk form and the block-diagonal attention mask.
    backward working set   one block's saved tensors again: the gradients a block's backward creates while its
                     saved tensors are still alive (with checkpointing, beside the block being recomputed)
    log-prob head    h [tokens, d] saved for the head, plus its working set: the chunked head holds at most
                     two [chunk, vocab] fp32 blocks (logits and the recomputed softmax), chunk = min(1024, tokens)
    runtime          CPU: the resident memory of this process now (Python, torch, elleci); CUDA: 0 (free
                     device memory is read after the CUDA context exists)
    peak ≈ their sum.

The activations are those of the pure-PyTorch kernels (the CPU path). On CUDA with Triton the scan and the
log-prob head save less, so there the plan is an upper bound.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from elleci.model import ElleciConfig, ElleciLM
from elleci.model.layers import BitLinear
from elleci.model.lora import LoraConfig, apply_lora, lora_modules

GiB = 2 ** 30
HEAD_CHUNK = 1024                 # token chunk of the pure-PyTorch log-prob head (kernels.logprobs)


@dataclass
class MemoryPlan:
    components: dict[str, int]            # name -> bytes (the peak is their sum)
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    checkpointing: bool
    tokens_per_micro_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(self.components.values())


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _storage_key(t: torch.Tensor):
    from torch.multiprocessing.reductions import StorageWeakRef
    return StorageWeakRef(t.untyped_storage()).cdata


def traced_activations(config: ElleciConfig, *, dtype: torch.dtype, lora: LoraConfig | None, sequences: int,
                       length: int, documents: bool = False) -> tuple[int, int]:
    """(bytes autograd saves over all blocks for one micro-batch, the largest single block's share), from a
    forward of the real architecture on fake tensors (no memory, no weights). documents=True: packed rows
    (two documents per row: a seq_idx forces the per-channel scan form and the block-diagonal mask)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from elleci.kernels import use_backend
    default = torch.get_default_dtype()
    per_block: list[int] = []
    with FakeTensorMode(), use_backend("torch"):
        torch.set_default_dtype(dtype)
        try:
            model = ElleciLM(config)
        finally:
            torch.set_default_dtype(default)
        if lora is not None:
            apply_lora(model, lora)
        model.train()
        params = {_storage_key(p) for p in model.parameters()}
        x = torch.zeros(sequences, length, config.d_model, dtype=dtype, requires_grad=True)
        positions = torch.arange(length).expand(sequences, length)
        seq_idx = (torch.arange(length) >= length // 2).to(torch.int32).expand(sequences, length) \
            if documents else None
        for block in model.blocks:
            saved: dict = {}

            def pack(t, saved=saved):
                key = _storage_key(t)
                if key not in params:
                    saved[key] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x = block(x, None, positions, None, None, seq_idx=seq_idx)
            per_block.append(sum(saved.values()))
    return sum(per_block), max(per_block)


def memory_plan(config: ElleciConfig, *, dtype: torch.dtype = torch.float32, lora: LoraConfig | None = None,
                sequences: int = 1, length: int = 1024, checkpointing: bool = False, optimizer: str = "adamw",
                reference_copy: bool = False, cuda: bool = False, documents: bool = False) -> MemoryPlan:
    """The plan (module docstring) of one optimizer step whose micro-batches hold `sequences` × `length` tokens."""
    with torch.device("meta"):
        model = ElleciLM(config).to(dtype)
        if lora is not None:
            apply_lora(model, lora)
    b = _bytes(dtype)
    lora_numel = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
    base_numel = sum(p.numel() for p in model.parameters()) - lora_numel
    if lora is not None:
        trainable, grad_bytes = lora_numel, 4
    else:
        trainable, grad_bytes = base_numel, b
    cache = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear)) * b \
        if BitLinear.cache_weights else 0
    full, one_block = traced_activations(config, dtype=dtype, lora=lora, sequences=sequences, length=length,
                                         documents=documents)
    tokens = sequences * length
    with_ckpt = config.n_layers * tokens * config.d_model * b + one_block
    chunk = min(HEAD_CHUNK, tokens)
    head = tokens * config.d_model * b + 2 * chunk * config.vocab_size * 4
    if lora is None:
        head += config.vocab_size * config.d_model * 4          # the fp32 lm_head gradient accumulator
    components = {
        "weights": base_numel * b * (2 if reference_copy else 1),
        "lora": lora_numel * 4,
        "gradients": trainable * grad_bytes,
        "optimizer": (2 * trainable * grad_bytes) if optimizer == "adamw" else 0,
        "bitlinear cache": cache,
        "activations": with_ckpt if checkpointing else full,
        "log-prob head": head,
        "backward working set": one_block,
        "runtime": 0 if cuda else _rss(),
    }
    notes = ["activations are the pure-PyTorch path's (an upper bound with Triton on CUDA)"] if cuda else []
    return MemoryPlan(components, full, with_ckpt, checkpointing, tokens, notes)


def _rss() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def gib(n: int) -> str:
    return f"{n / GiB:7.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:7.1f} MiB"


def format_plan(plan: MemoryPlan, *, tokens_per_step: int | None = None, accumulation: int | None = None) -> str:
    lines = ["memory plan (per process):"]
    for k, v in plan.components.items():
        lines.append(f"  {k:<21}{gib(v)}")
    lines.append(f"  {'peak':<21}{gib(plan.peak)}")
    lines.append(f"  activations per micro-batch ({plan.tokens_per_micro_batch} tokens): "
                 f"{gib(plan.activations_without_checkpointing).strip()} without gradient checkpointing, "
                 f"{gib(plan.activations_with_checkpointing).strip()} with it "
                 f"({'on' if plan.checkpointing else 'off'})")
    if tokens_per_step is not None:
        lines.append(f"  tokens per optimizer step: up to {tokens_per_step:,}"
                     + (f" ({accumulation} micro-batches per process)" if accumulation else ""))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def advice(plan: MemoryPlan, cfg) -> str:
    """The setting to change first when the plan does not fit."""
    if not cfg.model.gradient_checkpointing and plan.activations_with_checkpointing < plan.components["activations"]:
        return "set model.gradient_checkpointing = true"
    if cfg.model.dtype == "float32":
        return 'set model.dtype = "bfloat16"'
    if not cfg.uses_lora:
        return "add a [lora] section (r = 16) instead of full fine-tuning"
    if cfg.train.micro_batch_size > 1:
        return f"lower train.micro_batch_size (now {cfg.train.micro_batch_size})"
    return f"lower data.max_length (now {cfg.data.max_length})"


def plan_for_config(cfg, shape: dict) -> MemoryPlan:
    from elleci.recipes.loading import model_config, resolve_device
    config = model_config(cfg.model.path, cfg.model.n_heads)
    lora = None
    if cfg.uses_lora:
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.target_modules))
    device = resolve_device(cfg.model.device)
    return memory_plan(config, dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
                       lora=lora, sequences=shape["sequences_per_micro_batch"], length=cfg.data.max_length,
                       checkpointing=cfg.model.gradient_checkpointing, optimizer=cfg.train.optimizer,
                       reference_copy=shape.get("reference_copy", False), cuda=device.type == "cuda",
                       documents=shape.get("documents", False))


def check_fits(cfg, plan: MemoryPlan) -> None:
    """On CUDA, refuse a run whose plan exceeds the free device memory, naming the setting to change."""
    from elleci.recipes.loading import resolve_device
    device = resolve_device(cfg.model.device)
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if plan.peak > free:
        raise ValueError(f"the memory plan needs {plan.peak / GiB:.2f} GiB but {free / GiB:.2f} GiB are free on "
                         f"{device}: {advice(plan, cfg)} (`elleci <stage> CONFIG --plan` shows every component)")


def plan_for_stage(cfg, shape: dict) -> int:
    """`--plan`: print the plan and the tokens per optimizer step; exit status 2 when it cannot fit."""
    plan = plan_for_config(cfg, shape)
    per_item = shape["sequences_per_micro_batch"] // cfg.train.micro_batch_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(format_plan(plan, tokens_per_step=cfg.train.batch_size * per_item * cfg.data.max_length,
                      accumulation=cfg.train.batch_size // (cfg.train.micro_batch_size * world)))
    try:
        check_fits(cfg, plan)
    except ValueError as e:
        print(f"does not fit: {e}")
        return 2
    return 0
