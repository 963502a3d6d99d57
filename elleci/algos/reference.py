"""The reference model π_ref of every technique, in one vocabulary (DESIGN §5).

`reference` is always one of:

    "precomputed"   π_ref's log-probs were computed once and stored with the data (`ref_*` keys of the items):
                    no second model in memory; the small-GPU path (DPO, UNA, iterative DPO, SPAG, RLAIF-V)
    "adapters"      the same model with its LoRA adapters disabled: π_ref is the base under the adapters
    "frozen"        a frozen deep copy of the model taken when the reference is resolved (GRPO's start)
    "snapshot"      the trainable parameters (the LoRA weights when present) copied when the reference is
                    resolved and swapped in for each reference pass: a frozen copy at the cost of the adapters
    "none"          no reference (β = 0: the KL term vanishes)
    an nn.Module    a separate frozen model given by the caller

Which *policy* the reference is (the initial one, the previous iterate, the imitation model) is a different
setting, `reference_policy`, of the loops that have it (iterative DPO, SPAG).

    ref = resolve_reference(model, "snapshot")          # -> Reference
    with torch.no_grad():
        ref_logps = ref.run(lambda m: sequence_logprobs(m, ids, labels))
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import torch

from elleci.model.lora import disable_adapters, lora_modules

REFERENCES = ("precomputed", "adapters", "frozen", "snapshot", "none")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters that training changes (the LoRA weights when present)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def swapped_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Temporarily load `state` (from `trainable_state`) into the model; restore on exit."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"snapshot has parameters the model lacks: {missing[:5]}")
    saved = {n: params[n].detach().clone() for n in state}
    try:
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def check_reference(reference, allowed=REFERENCES) -> None:
    """Refuse a `reference` outside `allowed` (an nn.Module is allowed wherever "frozen" is)."""
    if isinstance(reference, torch.nn.Module):
        if "frozen" in allowed:
            return
        raise ValueError(f"reference=<nn.Module> is not supported here; choose one of {allowed}")
    if reference not in allowed:
        raise ValueError(f"unknown reference {reference!r}: choose one of {allowed} (or a frozen nn.Module where "
                         f"'frozen' is allowed)")


def _check_adapters_only(model: torch.nn.Module) -> None:
    if not lora_modules(model):
        raise ValueError("reference='adapters' needs a model with LoRA adapters (apply_lora first)")


class Reference:
    """A resolved reference: `run(fn)` evaluates fn(π_ref) without gradients and returns its result.

    `kind` is the vocabulary word; `run` is None-safe only for "precomputed" / "none", which have no model
    to run (calling it raises, naming the kind: the caller should have read the stored log-probs).
    """

    def __init__(self, kind: str, model: torch.nn.Module | None = None, state: dict | None = None):
        self.kind, self.model, self.state = kind, model, state

    @property
    def needs_model(self) -> bool:
        return self.kind not in ("precomputed", "none")

    def run(self, fn: Callable[[torch.nn.Module], object]):
        if not self.needs_model:
            raise ValueError(f"reference={self.kind!r} has no model to run (read the stored log-probs instead)")
        with torch.no_grad():
            if self.kind == "adapters":
                with disable_adapters(self.model):
                    return fn(self.model)
            if self.kind == "snapshot":
                with swapped_parameters(self.model, self.state):
                    return fn(self.model)
            return fn(self.model)                                   # "frozen" / a given module


def resolve_reference(model: torch.nn.Module, reference, *, allowed=REFERENCES,
                      snapshot: dict | None = None) -> Reference:
    """The `Reference` for `model` under the one vocabulary (module docstring).

    "frozen" deep-copies `model` now; "snapshot" copies its trainable state now (or uses `snapshot`, a
    `trainable_state` taken earlier); "adapters" checks the model has LoRA adapters.
    """
    check_reference(reference, allowed)
    if isinstance(reference, torch.nn.Module):
        return Reference("frozen", reference)                     # the caller's module, used as given
    if reference == "adapters":
        _check_adapters_only(model)
        return Reference("adapters", model)
    if reference == "frozen":
        return Reference("frozen", copy.deepcopy(model).eval().requires_grad_(False))
    if reference == "snapshot":
        return Reference("snapshot", model, trainable_state(model) if snapshot is None else snapshot)
    return Reference(reference)
