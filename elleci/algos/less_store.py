"""LESS step 2 at scale (arXiv 2402.04333): a datastore of projected gradient features, written shard by shard.

    feats, cost = collect_features(model, pool, ckpts, gradient="adam", pad_token_id=tok.pad_id, proj_dim=512,
                                   proj_seed=0, store_dir="out/less/store", name="pool")
    # feats [K, N, d] unit rows; cost {"ms_per_example", "peak_rss_mb", ...}; an interrupted run, rerun with the
    # same arguments, skips the shards already on disk and returns identical features.

Layout of `store_dir`: `meta.json` (projection and sharding settings; a mismatch raises) and one checkpoint
directory per (name, checkpoint, shard), `{name}-ckpt{k}-{i:05d}/`, holding `features.safetensors` with
"features" [n_i, d] (the projected gradients, before normalisation), "index" [n_i] (their example indices) and
"fingerprint" (SHA-256 of the gradient type, the checkpoint's tensors and the shard's examples: a shard made
from anything else raises), and its `manifest.json`. Each shard is published atomically and verified when
read (`elleci.checkpointing`), so a crash leaves whole shards only and a damaged one is named.

Glossary: K warm-up checkpoints, N examples, P LoRA parameters, d the projection dimension.

Differences from the paper: its `collect_grad_reps.py` saves a torch file every `save_interval` examples and
merges them at the end, without resume; here finished shards are skipped, and the featurisation cost
(milliseconds per example and checkpoint, peak memory) is measured and returned.
"""
from __future__ import annotations

import hashlib
import json
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch

from .._io import atomic_path, write_json_atomic
from ..checkpointing import publish_dir, verify_dir
from .less import adam_preconditioned, normalize_rows, project
from .less_grads import Example, WarmupCheckpoint, load_lora_state, lora_parameters, per_example_grads

GRADIENTS = ("adam", "sgd")
SHARD_FILE = "features.safetensors"


# ----------------------------------------------------------------------------- memory

def _rss_mb() -> float:
    """Resident set size now (Linux /proc), or the process's peak so far where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory inside a `with` block: CUDA's peak allocation on a CUDA device, else the peak RSS
    sampled every `interval` s by a thread (`peak_mb`; `extra_mb` = peak − value on entry)."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005):
        self.device, self.interval = torch.device(device), interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = self.peak_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.start_mb = self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())
        return False

    @property
    def extra_mb(self) -> float:
        return self.peak_mb - self.start_mb


# ----------------------------------------------------------------------------- the datastore

class FeatureStore:
    """Shards of projected features under `root`, with the settings that produced them in `meta.json`."""

    def __init__(self, root, meta: dict):
        self.root = Path(root)
        self.meta = json.loads(json.dumps(meta))                     # JSON-normalised (tuples → lists)
        path = self.root / "meta.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != self.meta:
                diff = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
                raise ValueError(f"{self.root} holds features made with other settings ({diff}); "
                                 "use another directory or delete it")
        else:
            write_json_atomic(path, self.meta)

    def path(self, name: str, ckpt: int, shard: int) -> Path:
        return self.root / f"{name}-ckpt{ckpt}-{shard:05d}"

    def load(self, name: str, ckpt: int, shard: int, index: torch.Tensor, fingerprint: torch.Tensor
             ) -> torch.Tensor | None:
        """The shard's features, or None when absent; a shard made from other inputs (or damaged) raises."""
        path = self.path(name, ckpt, shard)
        if not path.is_dir():
            return None
        verify_dir(path, required=(SHARD_FILE,))
        data = safetensors.torch.load_file(path / SHARD_FILE)
        if not (torch.equal(data["index"], index) and "fingerprint" in data
                and torch.equal(data["fingerprint"], fingerprint)):
            raise ValueError(f"{path} was made from other examples, another checkpoint or gradient type: the example "
                             "set or the warm-up changed; use another directory or delete it")
        return data["features"]

    def save(self, name: str, ckpt: int, shard: int, index: torch.Tensor, fingerprint: torch.Tensor,
             features: torch.Tensor) -> None:
        tensors = {"features": features.contiguous().cpu(), "index": index.contiguous(), "fingerprint": fingerprint}
        with publish_dir(self.path(name, ckpt, shard)) as tmp:
            safetensors.torch.save_file(tensors, str(tmp / SHARD_FILE))


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part).encode())
    return h


def checkpoint_digest(ckpt: WarmupCheckpoint) -> bytes:
    """SHA-256 of a checkpoint's tensors (names, values) and constants."""
    h = _digest([ckpt.lr, list(ckpt.betas), ckpt.eps])
    for kind in ("lora", "exp_avg", "exp_avg_sq"):
        for n in sorted(getattr(ckpt, kind)):
            h.update(f"{kind}.{n}".encode())
            h.update(getattr(ckpt, kind)[n].detach().float().cpu().contiguous().numpy().tobytes())
    return h.digest()


def shard_fingerprint(gradient: str, ckpt_digest: bytes, examples: Sequence[Example]) -> torch.Tensor:
    """uint8 [32]: SHA-256 of the gradient type, the checkpoint digest and the shard's (ids, labels)."""
    data = _digest(gradient, ckpt_digest, [[list(i), list(l)] for i, l in examples]).digest()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


# ----------------------------------------------------------------------------- featurisation

def featurize(model, examples: Sequence[Example], ckpt: WarmupCheckpoint, *, gradient: str, pad_token_id: int,
              proj_dim: int, proj_seed: int, proj_kind: str = "rademacher", block_rows: int = 4096,
              batch_size: int = 16, method: str = "auto") -> torch.Tensor:
    """Projected gradients [n, d] (not normalised) of `examples` at the model's current LoRA state: Adam's
    update direction Γ with the checkpoint's moments (gradient="adam") or the raw gradient ("sgd")."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient={gradient!r}; choose one of {GRADIENTS}")
    g = per_example_grads(model, examples, pad_token_id=pad_token_id, batch_size=batch_size, method=method)  # [n, P]
    if gradient == "adam":
        m, v = (t.to(g.device) for t in ckpt.flat_moments(list(lora_parameters(model))))
        g = adam_preconditioned(g, m, v, beta1=ckpt.betas[0], beta2=ckpt.betas[1], eps=ckpt.eps)
    return project(g, proj_dim, proj_seed, kind=proj_kind, block_rows=block_rows)            # [n, d]


def collect_features(model, examples: Sequence[Example], checkpoints: Sequence[WarmupCheckpoint], *, gradient: str,
                     pad_token_id: int, proj_dim: int = 512, proj_seed: int = 0, proj_kind: str = "rademacher",
                     block_rows: int = 4096, batch_size: int = 16, shard_size: int = 256, store_dir=None,
                     name: str = "train", method: str = "auto", print_fn=print) -> tuple[torch.Tensor, dict]:
    """Features of every example at every checkpoint → ([K, N, d] L2-normalised rows, cost).

    The model's trainable (LoRA) parameters are set to each checkpoint in turn and left at the last one.
    With `store_dir`, shards of `shard_size` examples are written there as they finish and reused when
    present (resume). cost: {"examples": featurised (example, checkpoint) pairs this call, "seconds",
    "ms_per_example" (per example and checkpoint), "peak_rss_mb" / "peak_extra_mb" (CPU RSS, or CUDA
    allocation on a GPU, during the computation, after one unmeasured warm-up batch), "shards_computed",
    "shards_loaded", "n_params"}. print_fn=None: silent.
    """
    if not checkpoints:
        raise ValueError("no warm-up checkpoints")
    if shard_size < 1 or not examples:
        raise ValueError(f"need examples and shard_size >= 1, got {len(examples)}, {shard_size}")
    n_params = sum(p.numel() for p in lora_parameters(model).values())
    print_fn = print_fn or (lambda *_: None)
    store = None
    if store_dir is not None:
        store = FeatureStore(store_dir, {"proj_dim": proj_dim, "proj_seed": proj_seed, "proj_kind": proj_kind,
                                         "block_rows": block_rows, "shard_size": shard_size, "n_params": n_params})
    device = next(model.parameters()).device
    # one batch first, unmeasured: torch.func's first call imports modules and grows the heap once per process
    per_example_grads(model, examples[:batch_size], pad_token_id=pad_token_id, batch_size=batch_size, method=method)
    out = torch.empty(len(checkpoints), len(examples), proj_dim)
    done = loaded = computed = 0
    seconds = 0.0
    with PeakMemory(device) as mem:
        for k, ckpt in enumerate(checkpoints):
            load_lora_state(model, ckpt.lora)
            digest = checkpoint_digest(ckpt)
            for shard, start in enumerate(range(0, len(examples), shard_size)):
                stop = min(start + shard_size, len(examples))
                index = torch.arange(start, stop)
                finger = shard_fingerprint(gradient, digest, examples[start:stop])
                feats = store.load(name, k, shard, index, finger) if store is not None else None
                if feats is None:
                    t0 = time.perf_counter()
                    feats = featurize(model, examples[start:stop], ckpt, gradient=gradient, pad_token_id=pad_token_id,
                                      proj_dim=proj_dim, proj_seed=proj_seed, proj_kind=proj_kind,
                                      block_rows=block_rows, batch_size=batch_size, method=method).cpu()
                    seconds += time.perf_counter() - t0
                    done, computed = done + (stop - start), computed + 1
                    if store is not None:
                        store.save(name, k, shard, index, finger, feats)
                    print_fn(f"features {name} | checkpoint {k} | examples {start}-{stop - 1} | "
                             f"{1000 * seconds / done:.1f} ms/example")
                else:
                    loaded += 1
                out[k, start:stop] = feats
    cost = {"examples": done, "seconds": seconds, "ms_per_example": 1000 * seconds / done if done else float("nan"),
            "peak_rss_mb": mem.peak_mb, "peak_extra_mb": mem.extra_mb, "shards_computed": computed,
            "shards_loaded": loaded, "n_params": n_params}
    return normalize_rows(out), cost


# ----------------------------------------------------------------------------- warm-up checkpoints on disk

def save_warmup_checkpoint(path, ckpt: WarmupCheckpoint) -> None:
    """One safetensors file: tensors "lora.<name>", "exp_avg.<name>", "exp_avg_sq.<name>"; lr, betas, eps and
    step in its metadata. Written atomically."""
    tensors = {f"{kind}.{n}": t.detach().contiguous().cpu()
               for kind in ("lora", "exp_avg", "exp_avg_sq") for n, t in getattr(ckpt, kind).items()}
    meta = {"lr": repr(ckpt.lr), "beta1": repr(ckpt.betas[0]), "beta2": repr(ckpt.betas[1]), "eps": repr(ckpt.eps),
            "step": str(ckpt.step)}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)


def load_warmup_checkpoint(path) -> WarmupCheckpoint:
    """Inverse of `save_warmup_checkpoint`."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if not {"lr", "beta1", "beta2", "eps", "step"} <= set(meta):
            raise ValueError(f"{path} is not a LESS warm-up checkpoint (metadata {sorted(meta)})")
        parts = {"lora": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for key in f.keys():
            kind, _, name = key.partition(".")
            parts[kind][name] = f.get_tensor(key)
    return WarmupCheckpoint(**parts, lr=float(meta["lr"]), betas=(float(meta["beta1"]), float(meta["beta2"])),
                            eps=float(meta["eps"]), step=int(meta["step"]))
