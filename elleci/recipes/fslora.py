"""`elleci fslora CONFIG`: FSLoRA, federated sketching LoRA (arXiv 2501.19389), on SFT JSONL split over clients.

    elleci fslora configs/tiny/fslora.toml                            # every client simulated in one process
    torchrun --nproc_per_node 4 -m elleci fslora configs/tiny/fslora.toml   # client c trains on rank c % 4

The global rank-r adapter ([lora] r) is trained in rounds: each round M sampled clients ([fslora]
clients_per_round) train a rank-k_i sketch of it (k_i drawn once per client from `budgets`) for H local
steps on their own data; the server averages their masked deltas (`elleci.algos.merging.fslora`). The
[data] train records (chat / Alpaca / OpenOrca, as `elleci sft`) are split over the clients: `iid` (a
seeded shuffle dealt round-robin) or `contiguous` (client c gets the c-th block of the file: non-IID when
the file is grouped by topic). Under torchrun the clients are shared over the processes and one all_reduce
per round sums their deltas (the same adapter as one process, up to the order of the sum). Rank 0 writes
out_dir/config.toml, rounds.jsonl (one record per round, with eval_loss on [data] eval) and final/ (the
adapter and its base, as the LoRA stages write it). A run is short and not checkpointed: re-running with
the same out_dir refuses to overwrite a finished final/.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from elleci._io import write_jsonl_atomic, write_text_atomic
from elleci.algos.merging.fslora import FSLoRAConfig, derive_seed, draw_client_ranks, run_fslora
from elleci.algos.sft import sft_collate, sft_step
from elleci.config_schema import ConfigError, check_fields, fail, optional_section, section, setting, to_toml
from elleci.model.lora import LoraConfig, apply_lora, set_sketches
from elleci.train import seed_everything
from elleci.trainer import checkpoints as ckpt
from elleci.trainer import distributed as dist

from .common import check_device, check_model_and_data
from .datasets import sft_items
from .loading import base_reference, load_model, load_tokenizer, resolve_device
from .sections import SFT_FORMATS, DataSection, LoraSection, ModelSection

NAME, HELP = "fslora", "FSLoRA: federated sketching LoRA over clients (simulated, or one rank per client group)"
SPLITS = ("iid", "contiguous")


@dataclass
class FSLoRASection:
    clients: int = setting(8, "N: clients the training records are split over", ge=1)
    clients_per_round: int = setting(4, "M: clients sampled each round", ge=1)
    rounds: int = setting(10, "server rounds", ge=1)
    local_steps: int = setting(10, "H: optimizer steps of a client per round", ge=1)
    batch_size: int = setting(8, "sequences per client step", ge=1)
    budgets: list[int] = setting([], "k_i drawn once per client from these ranks (empty: every client trains "
                                     "the full rank r: federated LoRA)")
    split: str = setting("iid", "how the records go to the clients: iid or contiguous", choices=SPLITS)
    client_lr: float = setting(3e-4, "client learning rate (constant)", gt=0)
    client_optimizer: str = setting("adamw", "client optimizer, fresh every round", choices=("adamw", "sgd"))
    server_optimizer: str = setting("sgd", "server optimizer over the averaged deltas (sgd lr 1: plain "
                                           "averaging)", choices=("sgd", "adamw"))
    server_lr: float = setting(1.0, "server learning rate", gt=0)
    max_grad_norm: float = setting(1.0, "client gradient clipping (0: none)", ge=0)
    eval_every: int = setting(1, "held-out loss on [data] eval every N rounds (and after the last)", ge=1)
    seed: int = setting(0, "seed of the split, the client ranks, the sampling and the sketches", ge=0)


@dataclass
class FSLoRASettings:
    out_dir: str = setting("", "directory for config.toml, rounds.jsonl and final/", required=True)
    model: ModelSection = section(ModelSection)
    lora: LoraSection | None = optional_section(LoraSection, "the global adapter (required, r >= 1)")
    data: DataSection = section(DataSection)
    fslora: FSLoRASection = section(FSLoRASection)

    def __post_init__(self):
        check_fields(self)

    def check(self) -> None:
        check_model_and_data(self.model, self.data, SFT_FORMATS)
        if self.lora is None or self.lora.r < 1:
            fail("lora.r", "FSLoRA trains a LoRA adapter: give a [lora] section with r >= 1")
        f = self.fslora
        if f.clients_per_round > f.clients:
            fail("fslora.clients_per_round", f"{f.clients_per_round} > clients ({f.clients})")
        bad = [k for k in f.budgets if not 1 <= k <= self.lora.r]
        if bad:
            fail("fslora.budgets", f"{bad} outside [1, lora.r = {self.lora.r}]")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > f.clients:
            fail("fslora.clients", f"{f.clients} clients for {world} processes: every process needs a client")
        check_device(self.model)

    @property
    def uses_lora(self) -> bool:
        return True


Config = FSLoRASettings


def plan_shape(cfg) -> dict:
    raise ConfigError("elleci fslora has no --plan (a client step is an `elleci sft` step of "
                      "[fslora] batch_size sequences: plan that)")


def split_clients(n_items: int, n_clients: int, how: str, seed: int) -> list[list[int]]:
    """Item indices per client: `iid` deals a seeded permutation round-robin, `contiguous` cuts the file into
    n_clients consecutive blocks (sizes differ by at most one). Every index exactly once."""
    if n_items < n_clients:
        raise ValueError(f"{n_items} training examples for {n_clients} clients: every client needs one")
    if how == "iid":
        order = list(range(n_items))
        random.Random(derive_seed("fslora-split", seed)).shuffle(order)
        return [order[c::n_clients] for c in range(n_clients)]
    bounds = [round(c * n_items / n_clients) for c in range(n_clients + 1)]
    return [list(range(bounds[c], bounds[c + 1])) for c in range(n_clients)]


@torch.no_grad()
def heldout_loss(model, items, collate, batch_size: int) -> float:
    """Token-weighted mean NLL of `items` (the eval_loss of `elleci sft`)."""
    total = tokens = 0.0
    model.eval()
    for i in range(0, len(items), batch_size):
        loss, m = sft_step(model, collate(items[i:i + batch_size]))
        n = float(m["sft/tokens"])
        total, tokens = total + float(loss) * n, tokens + n
    return total / max(tokens, 1.0)


def run(cfg: FSLoRASettings, *, allow_changes=()):
    out, f = Path(cfg.out_dir), cfg.fslora
    if (out / "final").is_dir():
        raise ValueError(f"{out / 'final'} exists: this FSLoRA run is finished (use a new out_dir)")
    tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    d = cfg.data
    train, skipped = sft_items(d.train, d.format, tok, d.max_length, d.max_examples)
    evals = sft_items(d.eval, d.format, tok, d.max_length, d.max_examples)[0] if d.eval else []
    split = split_clients(len(train), f.clients, f.split, f.seed)
    rank, world = dist.rank(), dist.world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{d.train}: {len(train)} training examples over {f.clients} clients ({f.split}; sizes "
        f"{[len(p) for p in split]}) on {world} process(es)" + (f"; {skipped}" if skipped.count else ""))
    seed_everything(f.seed)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = load_model(cfg.model.path, dtype=dtype, device=resolve_device(cfg.model.device), seed=f.seed,
                       n_heads=cfg.model.n_heads)
    lc = cfg.lora
    torch.manual_seed(f.seed)
    apply_lora(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                 target_modules=list(lc.target_modules), use_rslora=lc.use_rslora), sketched=True)
    model.to(next(model.lm_head.parameters()).device)
    ranks = draw_client_ranks(f.clients, f.budgets, seed=f.seed) if f.budgets else None
    fcfg = FSLoRAConfig(rounds=f.rounds, clients_per_round=f.clients_per_round, local_steps=f.local_steps,
                        ranks=ranks, client_lr=f.client_lr, client_optimizer=f.client_optimizer,
                        server_optimizer=f.server_optimizer, server_lr=f.server_lr, batch_size=f.batch_size,
                        max_grad_norm=f.max_grad_norm or None, seed=f.seed, eval_every=f.eval_every)
    collate = sft_collate(tok.pad_id)
    client_items = [[train[i] for i in part] for part in split]
    eval_fn = (lambda m: {"eval_loss": heldout_loss(m, evals, collate, f.batch_size)}) if evals and rank == 0 \
        else None
    if rank == 0:
        write_text_atomic(out / "config.toml", to_toml(cfg))
    history = run_fslora(model, client_items, collate, sft_step, fcfg, eval_fn=eval_fn, print_fn=say,
                         distributed=world > 1)
    set_sketches(model, None)                    # the global adapter: a plain rank-r LoRA from here on
    if rank == 0:
        write_jsonl_atomic(out / "rounds.jsonl", history)
        ckpt.save_final(out / "final", model, tok, base=base_reference(cfg.model.path), base_seed=f.seed)
        say(f"results: {out / 'final'} | rounds {out / 'rounds.jsonl'} | config {out / 'config.toml'}")
    dist.barrier()
    return model, history
