"""Child process of test_resume_faults.py: a small training run that checkpoints every step.

    python train_child.py OUT --steps N [--lr LR] [--resume]     # prints "saved <step>" after each save

A toy LM (embedding, dropout, LayerNorm, head) trained with AdamW + WSD on fixed random batches; dropout
makes every step depend on the RNG, so a resume is bit-exact only if weights, optimizer, scheduler and RNG
all come back. Every step is saved to OUT/checkpoint-<step> (the two newest kept) with the SHA-256 of the
weights in `extra`, and logged to OUT/metrics.jsonl. The final weights go to OUT/final.safetensors.
"""
import argparse
import hashlib
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# elleci's modules without the package's __init__ (which imports the whole library): the child starts fast
if "elleci" not in sys.modules:                     # (imported by a test, the real package is already there)
    _pkg = types.ModuleType("elleci")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "elleci")]
    sys.modules["elleci"] = _pkg
from elleci.checkpointing import checkpoint_steps, latest_checkpoint, remove_dir  # noqa: E402
from elleci.resume import load_checkpoint, save_checkpoint, truncate_metrics  # noqa: E402
from elleci.train import MetricLogger, make_optimizer, make_scheduler, optimizer_step  # noqa: E402

V, D = 64, 256


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.drop = nn.Embedding(V, D), nn.Dropout(0.2)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.norm(self.drop(self.emb(x))))


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode()), h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def setup(steps: int, lr: float):
    """(model, optimizer, scheduler, run settings) of a fresh run."""
    torch.manual_seed(0)
    model = Toy()
    opt = make_optimizer(model, lr=lr)
    sched = make_scheduler(opt, "wsd", total_steps=steps, warmup_steps=2, decay_steps=4)
    return model, opt, sched, {"lr": lr, "steps": steps, "model": "toy"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    model, opt, sched, settings = setup(args.steps, args.lr)
    start = 0
    ckpt = latest_checkpoint(out) if args.resume else None
    if ckpt is not None:
        start, extra = load_checkpoint(ckpt, model, opt, sched, run_config=settings)
        assert extra["weights_sha256"] == weights_digest(model), f"{ckpt}: weights of another step"
        truncate_metrics(out / "metrics.jsonl", start - 1)
        print(f"resumed {start} from {ckpt.name}", flush=True)
    log = MetricLogger(out / "metrics.jsonl", print_fn=None)
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, V, (16, 9), generator=data) for _ in range(args.steps)]
    for step in range(start, args.steps):
        x = batches[step]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer_step(model, opt, sched)
        log.log(step, loss=loss.item())
        save_checkpoint(out / f"checkpoint-{step + 1}", model, opt, sched, step=step + 1, run_config=settings,
                        extra={"weights_sha256": weights_digest(model)})
        for old in sorted(checkpoint_steps(out))[:-2]:
            remove_dir(out / f"checkpoint-{old}")
        print(f"saved {step + 1}", flush=True)
    from safetensors.torch import save_model
    save_model(model, str(out / "final.safetensors"))


if __name__ == "__main__":
    main()
