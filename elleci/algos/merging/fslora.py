"""FSLoRA: federated sketching LoRA (Fang, Han, Yuan, Hosseinalipour, Brinton; arXiv 2501.19389).

The server keeps one global rank-r adapter (B ∈ R^{out×r}, A ∈ R^{r×in}) per target layer. Client i has a
budget k_i ≤ r. Each round t:

    sample M of the N clients; for each client i a fresh k_i-subset I_i ⊂ {1..r} per layer, uniformly
    S_i = (r/k_i) Σ_{j∈I_i} e_j e_jᵀ                      E[S_i] = I   (so the sketched model is unbiased)
    client:  W₀ + s·B S_i A,  i.e. trains B[:, I_i], A[I_i, :] (scaled by r/k_i) for H local steps → θ_i
    server:  g = (1/M) Σ_i mask_i ⊙ (θ − θ_i)            divisor M even where fewer clients touched an index
             θ ← ServerOpt(θ, g)                         SGD lr 1: θ ← θ − g, the average of masked deltas

Glossary: N clients, M = `clients_per_round`, H = `local_steps`, k_i = client i's rank, s the LoRA scaling,
θ = every lora_A / lora_B, mask_i = rows I_i of A and columns I_i of B. Client compute, memory and upload
scale with k_i (`upload_params` in the history counts Σ_i Σ_layers k_i·(in + out)).

    apply_lora(model, LoraConfig(r=16, lora_alpha=32), sketched=True)
    cfg = FSLoRAConfig(rounds=20, clients_per_round=4, local_steps=10, ranks=[2, 4, 8, 16, ...])
    history = run_fslora(model, client_items, sft_collate(tok.pad_id), sft_step, cfg)
    # torchrun --nproc_per_node 4 ...: init_process_group(...), then run_fslora(..., distributed=True)

One round function serves both modes. In simulation the sampled clients run one after another in this
process and their deltas are summed. With `distributed=True` each rank owns the clients c with
c % world_size == rank (it reads only those entries of `client_items`), trains the sampled ones it owns,
and the summed deltas (plus the loss) travel in one `all_reduce`; every rank then applies the same server
step, so all ranks hold the same adapter (checked each round with one checksum all_reduce). Client and
sketch sampling, batches and dropout come from (seed, round, client) alone, never the global RNG, so a
distributed run equals the simulation with the same seed (up to the order of floating-point sums).

Differences from the paper's code (specs/algos_merge_data.md §2):
1. The sketch selects B[:, I], A[I, :] explicitly (`SketchedLoRALinear`). The published code instead
   trains B·S with grad·S² and divides by S afterwards (equal under SGD, not under Adam), and its mask
   test (`'lora_B' == name`) never matches, so as published it runs plain federated LoRA.
2. The client optimizer is created fresh every round (stateless clients, as in the code), over the full
   tensors: outside I_i the gradient is exactly 0, so Adam leaves those entries alone (weight decay may
   move them, but the upload is masked, so it never reaches the server).
3. Server default is SGD lr 1 (plain averaging of the masked deltas); the code's AdamW lr 3e-4 is
   `server_optimizer="adamw"`. Client default AdamW with torch's betas, constant lr, clipping at 1.0.
"""
from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from elleci._checks import check_bool, check_choice, check_int, check_number, fail, is_int
from elleci.model.lora import SketchedLoRALinear, lora_modules, set_sketches
from elleci.train import format_value, optimizer_step
from elleci.algos.loop import sample_batches

CLIENT_OPTIMIZERS = ("adamw", "sgd")
SERVER_OPTIMIZERS = ("sgd", "adamw")


@dataclass
class FSLoRAConfig:
    rounds: int = 10
    clients_per_round: int = 4                     # M
    local_steps: int = 10                          # H
    ranks: int | Sequence[int] | None = None       # k_i: None = r (no sketching), one int, or one per client
    client_lr: float = 3e-4
    client_optimizer: str = "adamw"                # fresh every round
    client_weight_decay: float = 0.0
    client_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    server_optimizer: str = "sgd"                  # persists over rounds (FedOpt)
    server_lr: float = 1.0
    server_betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 8
    seed: int = 0
    log_every: int = 1
    eval_every: int = 1
    check_sync: bool = True                        # distributed: checksum all_reduce after every round

    def __post_init__(self):
        name = "FSLoRAConfig"
        for field in ("rounds", "clients_per_round", "local_steps", "batch_size", "log_every", "eval_every"):
            check_int(name, field, getattr(self, field), ge=1)
        ranks = [self.ranks] if is_int(self.ranks) else self.ranks
        if not (ranks is None or (isinstance(ranks, (list, tuple)) and ranks
                                  and all(is_int(k) and k >= 1 for k in ranks))):
            fail(name, "ranks", "None, an int >= 1 or a non-empty list of ints >= 1 (one per client)", self.ranks)
        check_choice(name, "client_optimizer", self.client_optimizer, CLIENT_OPTIMIZERS)
        check_choice(name, "server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        for field in ("client_lr", "server_lr"):
            check_number(name, field, getattr(self, field), gt=0)
        check_number(name, "client_weight_decay", self.client_weight_decay, ge=0)
        check_number(name, "max_grad_norm", self.max_grad_norm, gt=0, optional=True)
        for field in ("client_betas", "server_betas"):
            betas = getattr(self, field)
            if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                    and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
                fail(name, field, "a pair of numbers in [0, 1)", betas)
        check_int(name, "seed", self.seed)
        check_bool(name, "check_sync", self.check_sync)


# ----------------------------------------------------------------------------- sketches and plans

def derive_seed(*keys) -> int:
    """A stable 63-bit seed from any keys (same on every process and Python run)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, keys)).encode()).digest()[:8], "little") >> 1


def draw_sketch(r: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """I: a uniform k-subset of {0..r-1}, sorted (randperm(r)[:k], as `SketchedLoRALinear.sample_sketch`)."""
    if not 1 <= k <= r:
        raise ValueError(f"sketch rank k must be in [1, r={r}], got {k}")
    return torch.randperm(r, generator=generator)[:k].sort().values


def sketch_matrix(r: int, indices: torch.Tensor) -> torch.Tensor:
    """S = (r/k) Σ_{j∈I} e_j e_jᵀ  [r, r] (float64; for checks and docs, training never builds it)."""
    d = torch.zeros(r, dtype=torch.float64)
    d[indices] = r / len(indices)
    return torch.diag(d)


def plan_round(seed: int, round_idx: int, client_ranks: Sequence[int], clients_per_round: int,
               layer_ranks: dict[str, int]) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """[(client, {layer: I}) for the M clients of round `round_idx`], from (seed, round) alone: the same
    on every rank. Clients without replacement; one fresh sketch per (client, layer)."""
    g = torch.Generator().manual_seed(derive_seed("fslora", seed, "round", round_idx))
    clients = torch.randperm(len(client_ranks), generator=g)[:clients_per_round].tolist()
    return [(c, {name: draw_sketch(r, client_ranks[c], g) for name, r in layer_ranks.items()}) for c in clients]


def resolve_ranks(ranks: int | Sequence[int] | None, n_clients: int, r: int) -> list[int]:
    """k_i for every client: None → r, an int → the same for all, a sequence → one per client; 1 ≤ k_i ≤ r."""
    ks = [r] * n_clients if ranks is None else [ranks] * n_clients if isinstance(ranks, int) else list(ranks)
    if len(ks) != n_clients:
        raise ValueError(f"ranks has {len(ks)} entries but there are {n_clients} clients")
    for i, k in enumerate(ks):
        if not (isinstance(k, int) and 1 <= k <= r):
            raise ValueError(f"client {i}: rank k_i={k!r} must be an int in [1, r={r}] (the adapters' rank)")
    return ks


def draw_client_ranks(n_clients: int, budgets: Sequence[int], seed: int = 0) -> list[int]:
    """Heterogeneous budgets: k_i drawn uniformly from `budgets` for each client (seeded)."""
    rng = random.Random(derive_seed("ranks", seed))
    return [rng.choice(list(budgets)) for _ in range(n_clients)]


def dirichlet_split(labels: Sequence, n_clients: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Non-IID split (Hsu et al. 2019): for each label, shares p ~ Dir(α·1_N) over clients, and that label's
    items are dealt out in those proportions. Small α: each client sees few labels. Empty clients take one
    item from the largest. Returns item indices per client (every index exactly once)."""
    if alpha <= 0 or n_clients < 1 or len(labels) < n_clients:
        raise ValueError(f"need alpha > 0 and at least one item per client (alpha={alpha}, {len(labels)} items, "
                         f"{n_clients} clients)")
    rng, parts = random.Random(derive_seed("dirichlet", seed)), [[] for _ in range(n_clients)]
    for label in sorted(set(labels), key=str):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        g = [rng.gammavariate(alpha, 1.0) for _ in range(n_clients)]
        cuts = [round(len(idx) * sum(g[:c + 1]) / sum(g)) for c in range(n_clients)]
        for c in range(n_clients):
            parts[c] += idx[(cuts[c - 1] if c else 0):cuts[c]]
    for c in range(n_clients):
        if not parts[c]:
            parts[c].append(max(parts, key=len).pop())
    return parts


# ----------------------------------------------------------------------------- model pieces

def sketched_modules(model: nn.Module) -> dict[str, SketchedLoRALinear]:
    """Name → SketchedLoRALinear; raises unless every LoRA layer of the model is sketched."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers: apply_lora(model, LoraConfig(...), sketched=True) first")
    plain = [n for n, m in mods.items() if not isinstance(m, SketchedLoRALinear)]
    if plain:
        raise ValueError(f"FSLoRA needs sketched adapters, but {plain[:3]}... are plain LoRALinear: "
                         "apply_lora(model, config, sketched=True)")
    return mods


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """'<layer>.lora_A' / '<layer>.lora_B' → parameter, for every sketched layer (the communicated θ)."""
    return {f"{n}.{w}": getattr(m, w) for n, m in sketched_modules(model).items() for w in ("lora_A", "lora_B")}


def sketch_masks(model: nn.Module, sketches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mask_i per parameter, bool and broadcastable: lora_A [r, 1] (rows I), lora_B [1, r] (columns I)."""
    out = {}
    for name, m in sketched_modules(model).items():
        if name not in sketches:
            raise KeyError(f"no sketch for layer {name!r}")
        rows = torch.zeros(m.r, dtype=torch.bool, device=m.lora_A.device)
        rows[sketches[name].to(rows.device)] = True
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = rows[:, None], rows[None, :]
    return out


def client_batches(items: Sequence, cfg: FSLoRAConfig, round_idx: int, client: int, collate_fn: Callable):
    """batch_fn(h) for client `client` in round `round_idx`: deterministic in (seed, round, client, h)."""
    if not items:
        raise ValueError(f"client {client} has no training items")
    return sample_batches(items, cfg.batch_size, derive_seed("fslora", cfg.seed, "batches", round_idx, client),
                          collate_fn)


@contextmanager
def _rng_scope(seed: int, device: torch.device):
    """Global torch RNG (dropout) seeded inside, restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def client_update(model: nn.Module, sketches: dict[str, torch.Tensor], batch_fn: Callable[[int], object],
                  loss_fn: Callable, *, steps: int, lr: float, optimizer: str = "adamw", weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float | None = 1.0
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """H local steps on W₀ + s·B S A from the current (global) adapter with a fresh optimizer; returns
    ({param: mask ⊙ (θ_global − θ_i)}, mean loss). The model leaves with the global adapter and no sketch."""
    params = lora_parameters(model)
    if set(sketches) != {n.rsplit(".", 1)[0] for n in params}:
        raise ValueError("sketches must name every sketched LoRA layer of the model (plan_round / sample_sketches)")
    start = {n: p.detach().clone() for n, p in params.items()}
    if optimizer == "adamw":
        opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=betas, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(list(params.values()), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"client optimizer {optimizer!r}; choose one of {CLIENT_OPTIMIZERS}")
    was_training, losses = model.training, []
    set_sketches(model, sketches)
    model.train()
    try:
        for h in range(steps):
            loss, _ = loss_fn(model, batch_fn(h))
            loss.backward()
            optimizer_step(model, opt, None, max_grad_norm)
            losses.append(loss.item())
        masks = sketch_masks(model, sketches)
        with torch.no_grad():                                                    # mask_i ⊙ (θ − θ_i)
            delta = {n: torch.where(masks[n], start[n] - p, 0.0) for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        set_sketches(model, None)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return delta, sum(losses) / len(losses)


def make_server_optimizer(model: nn.Module, cfg: FSLoRAConfig) -> torch.optim.Optimizer:
    """SGD(lr) or AdamW(lr, betas, no weight decay) over the LoRA parameters; kept across rounds."""
    params = list(lora_parameters(model).values())
    if cfg.server_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.server_lr)
    return torch.optim.AdamW(params, lr=cfg.server_lr, betas=cfg.server_betas, weight_decay=0.0)


def server_step(model: nn.Module, summed_delta: dict[str, torch.Tensor], M: int,
                optimizer: torch.optim.Optimizer) -> None:
    """p.grad = g = (1/M) Σ_i mask_i ⊙ (θ − θ_i), then one server optimizer step."""
    params = lora_parameters(model)
    if set(summed_delta) != set(params):
        raise ValueError("summed_delta must hold exactly the model's lora_A / lora_B parameters")
    for n, p in params.items():
        p.grad = (summed_delta[n] / M).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- rounds

def fslora_round(model: nn.Module, round_idx: int, client_items: Sequence, collate_fn: Callable, loss_fn: Callable,
                 cfg: FSLoRAConfig, server_opt: torch.optim.Optimizer, client_ranks: Sequence[int], *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 owns: Callable[[int], bool] | None = None) -> dict:
    """One round. Trains the sampled clients this process owns (`owns(c)`, default all), sums their masked
    deltas and losses into one flat buffer, `reduce`s it (None: this process is the world; distributed:
    all_reduce SUM) and applies the server step. Returns the round's record."""
    mods, params = sketched_modules(model), lora_parameters(model)
    M, device = cfg.clients_per_round, next(iter(params.values())).device
    plan = plan_round(cfg.seed, round_idx, client_ranks, M, {n: m.r for n, m in mods.items()})
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    loss_sum = 0.0
    for c, sketches in plan:
        if owns is not None and not owns(c):
            continue
        batch_fn = client_batches(client_items[c], cfg, round_idx, c, collate_fn)
        with _rng_scope(derive_seed("fslora", cfg.seed, "client", round_idx, c), device):
            delta, loss = client_update(model, sketches, batch_fn, loss_fn, steps=cfg.local_steps,
                                        lr=cfg.client_lr, optimizer=cfg.client_optimizer,
                                        weight_decay=cfg.client_weight_decay, betas=cfg.client_betas,
                                        max_grad_norm=cfg.max_grad_norm)
        for n in total:
            total[n] += delta[n]
        loss_sum += loss
    dtype = next(iter(total.values())).dtype
    flat = torch.cat([t.flatten() for t in total.values()] + [torch.tensor([loss_sum], dtype=dtype, device=device)])
    if reduce is not None:
        flat = reduce(flat)
    summed, offset = {}, 0
    for n, t in total.items():
        summed[n], offset = flat[offset:offset + t.numel()].view_as(t), offset + t.numel()
    server_step(model, summed, M, server_opt)
    ks = [client_ranks[c] for c, _ in plan]
    upload = sum(k * (m.in_features + m.out_features) for k in ks for m in mods.values())
    return {"round": round_idx, "clients": [c for c, _ in plan], "ranks": ks, "loss": float(flat[-1]) / M,
            "upload_params": upload}


def _format(rec: dict) -> str:
    parts = [f"round {rec['round']}", f"loss {format_value('loss', rec['loss'])}",
             "k " + ",".join(map(str, rec["ranks"])), f"upload {rec['upload_params']:,}"]
    ev = rec.get("eval", {})
    parts += [f"{k} {format_value(k, float(v))}" for k, v in ev.items() if isinstance(v, (int, float))]
    return " | ".join(parts + [f"{rec['seconds']:.1f} s"])


def _sync_checksum(params: dict[str, torch.Tensor], round_idx: int, group) -> None:
    """Raise unless every rank holds the same adapter: max and −min of (Σθ, Σθ²) in one all_reduce."""
    import torch.distributed as dist
    v = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params.values()]).sum(0)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:2], -both[2:]):
        raise RuntimeError(f"FSLoRA ranks out of sync after round {round_idx}: checksum max {both[:2].tolist()} != "
                           f"min {(-both[2:]).tolist()} (different data or seeds per rank, or a non-deterministic "
                           "reduce)")


def run_fslora(model: nn.Module, client_items: Sequence[Sequence], collate_fn: Callable, loss_fn: Callable,
               cfg: FSLoRAConfig, eval_fn: Callable[[nn.Module], dict | float] | None = None, print_fn=print, *,
               distributed: bool = False, group=None) -> list[dict]:
    """FSLoRA for `cfg.rounds` rounds on a model with sketched LoRA applied (`apply_lora(..., sketched=True)`).

    client_items[c]: client c's training items (for `collate_fn`); loss_fn(model, batch) → (loss, metrics).
    distributed=True: torch.distributed must be initialised; this rank trains clients c % world == rank
    (other entries of client_items are never read; every rank must pass the same number of clients) and
    rank 0's adapter is broadcast first. eval_fn(model) → dict (or a number) every `eval_every` rounds and
    after the last, on every rank that passes one. Prints on rank 0 only. Returns one record per round:
    {"round", "clients", "ranks", "loss" (mean client loss), "upload_params", "seconds", ["eval"]}.
    """
    mods, params = sketched_modules(model), lora_parameters(model)
    n, M = len(client_items), cfg.clients_per_round
    if M > n:
        raise ValueError(f"clients_per_round M={M} > number of clients N={n}")
    client_ranks = resolve_ranks(cfg.ranks, n, min(m.r for m in mods.values()))
    lora_ids = {id(p) for p in params.values()}
    other = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if other:
        raise ValueError(f"FSLoRA trains and communicates only lora_A / lora_B, but {other[:3]} also require "
                         "grad: freeze them (mark_only_lora_trainable(model))")
    rank, reduce, owns = 0, None, None
    if distributed:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group first (e.g. torchrun)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        owns = lambda c: c % world == rank                                   # noqa: E731
        reduce = lambda t: (dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group), t)[1]   # noqa: E731
        with torch.no_grad():
            flat = torch.cat([p.detach().flatten() for p in params.values()])
            dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
            offset = 0
            for p in params.values():
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    for c in range(n):
        if (owns is None or owns(c)) and not client_items[c]:
            raise ValueError(f"client {c} has no training items")
    server_opt, history = make_server_optimizer(model, cfg), []
    for t in range(cfg.rounds):
        t0 = time.perf_counter()
        rec = fslora_round(model, t, client_items, collate_fn, loss_fn, cfg, server_opt, client_ranks,
                           reduce=reduce, owns=owns)
        if distributed and cfg.check_sync:
            _sync_checksum(params, t, group)
        last = t == cfg.rounds - 1
        if eval_fn is not None and ((t + 1) % cfg.eval_every == 0 or last):
            ev = eval_fn(model)
            rec["eval"] = ev if isinstance(ev, dict) else {"eval": float(ev)}
        rec["seconds"] = time.perf_counter() - t0
        if rank == 0 and print_fn is not None and (t % cfg.log_every == 0 or last):
            print_fn(_format(rec))
        history.append(rec)
    return history
