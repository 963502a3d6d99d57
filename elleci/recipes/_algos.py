"""Algorithm modules by name, wherever the `elleci.algos` layout keeps them (flat today; in sections
`alignment/`, `reasoning/`, `merging/`, `curation/` after the move): `algo("reward_model").encode_preferences`."""
from __future__ import annotations

import importlib

PLACES = ("elleci.algos.", "elleci.algos.alignment.", "elleci.algos.reasoning.", "elleci.algos.merging.",
          "elleci.algos.curation.")


def algo(name: str):
    for place in PLACES:
        try:
            return importlib.import_module(place + name)
        except ModuleNotFoundError as e:
            if not (place + name).startswith(e.name or "\0"):
                raise                              # a missing dependency inside the module, not the module
    raise ModuleNotFoundError(f"no algorithm module {name!r} under elleci.algos")


def _token_reduction_name() -> str:
    import inspect

    from elleci.algos.logprobs import sequence_logprobs
    return "token_reduction" if "token_reduction" in inspect.signature(sequence_logprobs).parameters else "reduction"


TOKEN_REDUCTION = _token_reduction_name()


def tokred(value: str) -> dict:
    """{"token_reduction": value}: sum vs mean over tokens, under the keyword this elleci.algos uses (the layout
    move renamed `reduction` to `token_reduction`; drop this once every branch has the new name)."""
    return {TOKEN_REDUCTION: value}
