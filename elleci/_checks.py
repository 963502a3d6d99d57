"""Field checks for the `*Config` dataclasses, so that every config rejects a bad value the same way, in its
`__post_init__`: a ValueError naming the class, the field, what is allowed and what was given, e.g.

    GRPOConfig.steps must be an int >= 1, got 0
    LoraConfig.lora_dropout must be a number in [0, 1), got 1.5

A bool is never taken for a number (True is an int to Python, never a step count here). Imports nothing
from elleci, so any layer may use it.
"""
from __future__ import annotations

import math
from collections.abc import Collection


def fail(owner: str, name: str, allowed: str, value) -> None:
    raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _range(ge=None, gt=None, le=None, lt=None) -> str:
    lo = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    hi = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" >= {ge}" if ge is not None else f" > {gt}"
    if hi:
        return f" <= {le}" if le is not None else f" < {lt}"
    return ""


def _within(v, ge=None, gt=None, le=None, lt=None) -> bool:
    return ((ge is None or v >= ge) and (gt is None or v > gt) and (le is None or v <= le)
            and (lt is None or v < lt))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(owner: str, name: str, value, *, ge: int | None = None, le: int | None = None,
              optional: bool = False) -> None:
    """An int (not a bool) in [ge, le]; `optional`: None is allowed too."""
    if optional and value is None:
        return
    if not (is_int(value) and _within(value, ge=ge, le=le)):
        fail(owner, name, "an int" + _range(ge=ge, le=le) + (" or None" if optional else ""), value)


def check_number(owner: str, name: str, value, *, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None, optional: bool = False,
                 inf: bool = False) -> None:
    """A finite int or float (not a bool) within the bounds; `inf`: math.inf is allowed too; `optional`: None."""
    if optional and value is None:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
          and (math.isfinite(value) or (inf and value == math.inf)) and _within(value, ge, gt, le, lt))
    if not ok:
        extra = (" or math.inf" if inf else "") + (" or None" if optional else "")
        fail(owner, name, "a number" + _range(ge, gt, le, lt) + extra, value)


def check_choice(owner: str, name: str, value, choices: Collection) -> None:
    """One of `choices`, of the same type (1 is not True, "1" is not 1)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        fail(owner, name, f"one of {tuple(choices)}", value)


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        fail(owner, name, "True or False", value)


def check_str(owner: str, name: str, value, *, empty: bool = True) -> None:
    if not isinstance(value, str) or (not empty and not value):
        fail(owner, name, "a string" if empty else "a non-empty string", value)


def check_modules(owner: str, name: str, value, *, optional: bool = False) -> None:
    """A module-name pattern: one string or a list/tuple of strings (PEFT's target_modules)."""
    if optional and value is None:
        return
    if not (isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(m, str) for m in value))):
        fail(owner, name, "a string or a list of strings" + (" or None" if optional else ""), value)
