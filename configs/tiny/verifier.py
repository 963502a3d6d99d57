"""A verifier for configs/tiny/data/prompts*.jsonl, given to the online stages as
`reward.verifier = "configs/tiny/verifier.py:reward"` (a file path or an importable module, then a function).

    reward(record, response) -> float     record: the prompt's JSONL record (here {"prompt", "answer"})

1.0 when the last number in the response is the record's answer, else 0.0. Write your own the same way:
any function of (record, response text) returning a float.
"""
import re

_NUMBER = re.compile(r"-?\d+")


def reward(record: dict, response: str) -> float:
    numbers = _NUMBER.findall(response)
    return float(bool(numbers) and numbers[-1] == str(record["answer"]))
