"""The metrics of a step: means weighted by each micro-batch's units over all micro-batches and processes,
and TRL's metric names beside ours."""
from __future__ import annotations

from . import distributed as dist

TRL_NAMES = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins"}


def trl_aliases(metrics: dict) -> dict:
    """Add TRL's names (`rewards/accuracies`, `rewards/margins`) beside ours where they differ."""
    out = dict(metrics)
    for ours, theirs in TRL_NAMES.items():
        for prefix in ("", "eval_"):
            if prefix + ours in metrics:
                out[prefix + theirs] = metrics[prefix + ours]
    return out


class WeightedMean:
    """Σ w·x / Σ w per key (keys may be missing from some micro-batches); counts (keys ending in "/tokens")
    are summed instead."""

    def __init__(self):
        self.num, self.den, self.counts = {}, {}, {}

    def add(self, metrics: dict, w: float) -> None:
        self.add_counts(metrics)
        for k, v in metrics.items():
            v = float(v.item() if hasattr(v, "item") else v)
            self.num[k] = self.num.get(k, 0.0) + v * w
            self.den[k] = self.den.get(k, 0.0) + w

    def add_counts(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if k.endswith("/tokens"):
                self.counts[k] = self.counts.get(k, 0.0) + float(v.item() if hasattr(v, "item") else v)

    def merge_across_processes(self) -> "WeightedMean":
        """Σ over processes of every numerator, denominator and count (a weighted mean of the whole step)."""
        if dist.world_size() == 1:
            return self
        merged = WeightedMean()
        for num, den, counts in dist.gather_objects((self.num, self.den, self.counts)):
            for mine, theirs in ((merged.num, num), (merged.den, den), (merged.counts, counts)):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0.0) + v
        return merged

    def result(self) -> dict:
        out = {k: self.num[k] / self.den[k] for k in self.num if self.den[k] > 0 and k not in self.counts}
        return {**out, **self.counts}
