"""Synthetic data generation and curation as composable steps (Long et al., "On LLMs-Driven Synthetic Data
Generation, Curation, and Evaluation", Findings of ACL 2024, https://arxiv.org/abs/2406.15126).

    spec = TaskSpec("arithmetic", "You write worked solutions.", output_format="End with 'Answer: <n>'.")
    grid = AttributeGrid({"level": [1, 3], "ops": ["+", "+ -"]}, probs={"level": [0.5, 0.5]},
                         allowed=lambda a: a["level"] > 1 or a["ops"] == "+")     # no subtraction at level 1
    items = build_prompts(spec, grid, 200, seed=0, input_fn=pick_question, demo_pool=demos, k_demos=2)
    records = generate(items, LMTeacher(model, tok, temperature=1.0), k=4, seed=1)   # or CallableTeacher(fn)
    kept, rejected, stats = apply_filters(records, [verifier_filter(check), exact_dedup_filter()])
    write_records("out/synth.jsonl", kept)                      # atomically, one record per line

    # label-first generation (classification): the label is an attribute, the teacher writes the input
    spec = TaskSpec("sentiment", "You write movie reviews.", labels=("positive", "negative"),
                    request="Write a {label} review.")
    items = build_prompts(spec, AttributeGrid({"label": ["positive", "negative"]}), 100, seed=0)

Objective: D_gen = {(x, y) : y ~ M(p(T, a, D_demo, x)), a ~ P(A), every filter f(x, y) = keep}, faithful
(verified) and diverse (attribute coverage, distinct n-grams).

Glossary:
    M           the generator (teacher): an ElleciLM + tokenizer (`LMTeacher`) or any callable
                prompts → texts (`CallableTeacher`, e.g. an external model's API)
    T           the task specification (`TaskSpec`): role framing, label space, output format, request
    a ~ P(A)    attribute values drawn from the grid (`AttributeGrid`): per-attribute marginals, restricted
                to the allowed combinations
    D_demo      k in-context demonstrations chosen from a pool (`select_demos`)
    x, y        the input (optional: given by `input_fn`, e.g. an unlabelled question) and the output
    k           samples per prompt
Stages (the survey's pipeline, §Generation/§Curation/§Evaluation): 1 task spec, 2 conditional prompting,
3 in-context demos, 4 generation (`generate`), 5 filtering (`synth_filters`), 6 re-weighting and
8 direct evaluation (`synth_metrics`); 7 label enhancement by vote is `self_consistency_filter`.

Every record keeps its provenance: id, prompt_id, task, teacher, prompt (messages), input, attributes, demos
(ids), seed ({"prompts", "generation"}), sample index, output, filters_passed, scores (and `weight` after
`synth_metrics.with_weights`).

Differences from the survey:
1. Demo relevance is attribute overlap or word-bigram Jaccard with the input, not an embedding kNN.
2. Attributes are independent apart from the `allowed` constraint (rejection sampling: the product of the
   marginals conditioned on allowed); a full joint table can be one attribute whose values are tuples.
3. Dataset-wise multi-round generation steered by feedback is left to the caller (loop over
   `build_prompts` → `generate` → `apply_filters` with a new grid); `grow_pool` adds accepted records to
   the demo pool (self-instruct).
4. Inputs come from the caller's `input_fn` (e.g. unlabelled questions); the teacher writes the outputs.
   A teacher may also write inputs: put the request for one in `TaskSpec.request` and leave input_fn None.
"""
from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elleci.data import read_jsonl
from elleci.algos.feedback import write_jsonl
from elleci.algos.sampling import complete, prompt_ids, sample_responses
from elleci.algos.curation.synth_filters import Filter, apply_filters, jaccard, shingles

__all__ = ["TaskSpec", "AttributeGrid", "select_demos", "grow_pool", "render_prompt", "build_prompts", "LMTeacher",
           "CallableTeacher", "generate", "synthesize", "write_records", "read_records", "REQUIRED_FIELDS"]

REQUIRED_FIELDS = ("id", "prompt_id", "task", "teacher", "prompt", "input", "attributes", "demos", "seed", "sample",
                   "output", "filters_passed", "scores")
DEMO_STRATEGIES = ("attributes", "similar", "random")
DEMO_STYLES = ("turns", "inline")


# ----------------------------------------------------------------------------------------------
# 1. Task specification

def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


@dataclass(frozen=True)
class TaskSpec:
    """What to generate: role framing (the system message), output format, label space and the request
    template of the user turn (formatted with `input` and the record's attributes)."""
    name: str
    instruction: str
    output_format: str = ""
    labels: tuple[str, ...] = ()
    request: str = "{input}"
    attribute_template: str | None = None  # how the system message states the attributes; None: "Attributes: k=v; ..."
    show_attributes: bool = True          # state the sampled attributes in the system message

    def __post_init__(self):
        if not self.name:
            raise ValueError("TaskSpec needs a non-empty name")
        if not _fields(self.request):
            raise ValueError(f"TaskSpec.request {self.request!r} has no field: it must hold {{input}} or an attribute")

    def system(self, attributes: Mapping) -> str:
        """The system message: instruction, the attributes, the label space, the output format ("" = none)."""
        parts = [self.instruction] if self.instruction else []
        if self.show_attributes and attributes:
            if self.attribute_template is None:
                parts.append("Attributes: " + "; ".join(f"{k}={v}" for k, v in attributes.items()))
            else:
                missing = _fields(self.attribute_template) - set(attributes)
                if missing:
                    raise ValueError(f"TaskSpec.attribute_template needs the attributes {sorted(missing)}")
                parts.append(self.attribute_template.format(**attributes))
        if self.labels:
            parts.append("Labels: " + ", ".join(self.labels))
        if self.output_format:
            parts.append(self.output_format)
        return "\n".join(parts)

    def user(self, input: str | None, attributes: Mapping) -> str:
        """The request of one turn, e.g. "{input}" → the question."""
        missing = _fields(self.request) - {"input"} - set(attributes)
        if missing:
            raise ValueError(f"TaskSpec.request needs the attributes {sorted(missing)}; got {sorted(attributes)}")
        if "input" in _fields(self.request) and input is None:
            raise ValueError("TaskSpec.request uses {input} but no input was given (pass input_fn)")
        return self.request.format(input=input, **attributes)


# ----------------------------------------------------------------------------------------------
# 2. Conditional prompting: attributes

@dataclass(frozen=True)
class AttributeGrid:
    """Attribute pools {name: values} with per-attribute probabilities (default uniform) and an optional
    constraint `allowed(a) -> bool` (e.g. no subtraction at level 1). A draw is one value per attribute:
    P(a) = Π_name P_name(a[name]) · 1[allowed(a)] / Z, sampled by rejection."""
    pools: Mapping[str, Sequence]
    probs: Mapping[str, Sequence[float]] = field(default_factory=dict)
    allowed: Callable[[Mapping], bool] | None = None

    def __post_init__(self):
        if not self.pools or any(len(v) == 0 for v in self.pools.values()):
            raise ValueError("AttributeGrid needs at least one attribute, each with at least one value")
        unknown = set(self.probs) - set(self.pools)
        if unknown:
            raise ValueError(f"probs given for unknown attributes {sorted(unknown)}")
        for k, p in self.probs.items():
            if len(p) != len(self.pools[k]) or any(x < 0 for x in p) or sum(p) <= 0:
                raise ValueError(f"probs[{k!r}] must be {len(self.pools[k])} non-negative numbers with a positive sum")
        if self._mass() <= 0:
            raise ValueError("no allowed combination of attribute values has positive probability")

    def marginal(self, name: str) -> list[float]:
        """P_name over the values of one attribute (normalised)."""
        p = list(self.probs.get(name, [1.0] * len(self.pools[name])))
        return [x / sum(p) for x in p]

    def _raw(self, a: Mapping) -> float:
        p = 1.0
        for k, values in self.pools.items():
            p *= self.marginal(k)[list(values).index(a[k])]
        return p

    def _mass(self) -> float:
        return sum(self._raw(a) for a in self.cells())

    def cells(self) -> list[dict]:
        """Every allowed combination of values, in pool order."""
        names = list(self.pools)
        combos = (dict(zip(names, c)) for c in itertools.product(*(self.pools[k] for k in names)))
        return [a for a in combos if self.allowed is None or self.allowed(a)]

    def probability(self, attributes: Mapping) -> float:
        """P(a) under the configured distribution (0 for a disallowed combination)."""
        missing = set(self.pools) - set(attributes)
        if missing:
            raise ValueError(f"attributes lack {sorted(missing)}")
        if self.allowed is not None and not self.allowed(attributes):
            return 0.0
        return self._raw(attributes) / self._mass()

    def sample(self, n: int, seed: int) -> list[dict]:
        """n draws, deterministic in the seed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"synth/attributes/{seed}")
        names, out = list(self.pools), []
        while len(out) < n:
            a = {k: rng.choices(list(self.pools[k]), weights=self.marginal(k))[0] for k in names}
            if self.allowed is None or self.allowed(a):                       # rejection: P(a | allowed)
                out.append(a)
        return out


# ----------------------------------------------------------------------------------------------
# 3. In-context demonstrations

def select_demos(pool: Sequence[Mapping], k: int, rng: random.Random, *, attributes: Mapping | None = None,
                 query: str | None = None, strategy: str = "attributes") -> list[Mapping]:
    """k demos {"input", "output"[, "attributes", "id"]} from the pool: most shared attribute values
    ("attributes"), highest word-bigram Jaccard with `query` ("similar"), or at random; ties are broken at
    random by `rng`."""
    if strategy not in DEMO_STRATEGIES:
        raise ValueError(f"unknown demo strategy {strategy!r}; choose one of {DEMO_STRATEGIES}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return []
    if len(pool) < k:
        raise ValueError(f"the demo pool has {len(pool)} entries, fewer than k={k}")
    order = rng.sample(range(len(pool)), len(pool))                    # random tie-break
    if strategy == "attributes":
        a = dict(attributes or {})
        key = lambda i: -sum(pool[i].get("attributes", {}).get(n) == v for n, v in a.items())
        order.sort(key=key)
    elif strategy == "similar":
        if query is None:
            raise ValueError("strategy='similar' needs a query (the input)")
        q = shingles(query, 2)
        order.sort(key=lambda i: -jaccard(q, shingles(pool[i].get("input") or "", 2)))
    return [pool[i] for i in order[:k]]


def grow_pool(pool: Sequence[Mapping], records: Sequence[Mapping]) -> list[dict]:
    """The demo pool plus accepted records (self-instruct): each as {"id", "input", "output", "attributes"}."""
    return list(pool) + [{"id": r["id"], "input": r.get("input"), "output": r["output"],
                          "attributes": dict(r.get("attributes", {}))} for r in records]


def render_prompt(spec: TaskSpec, attributes: Mapping, demos: Sequence[Mapping] = (), input: str | None = None,
                  *, style: str = "turns") -> list[dict]:
    """Chat messages: system (spec + attributes; none when that is empty), the demos, the request.

    style="turns": each demo is a user/assistant exchange before the request (chat few-shot);
    style="inline": the demos are written into the request turn as "Example:" blocks.
    """
    if style not in DEMO_STYLES:
        raise ValueError(f"unknown demo style {style!r}; choose one of {DEMO_STYLES}")
    system = spec.system(attributes)
    messages = [{"role": "system", "content": system}] if system else []
    request = spec.user(input, attributes)
    asks = [spec.user(d.get("input"), {**attributes, **d.get("attributes", {})}) for d in demos]
    if style == "turns":
        for ask, d in zip(asks, demos):
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": d["output"]}]
    elif demos:
        blocks = [f"Example:\n{ask}\n{d['output']}" for ask, d in zip(asks, demos)]
        request = "\n\n".join(blocks + [request])
    return messages + [{"role": "user", "content": request}]


def build_prompts(spec: TaskSpec, grid: AttributeGrid, n: int, *, seed: int,
                  input_fn: Callable[[Mapping, random.Random], str] | None = None,
                  demo_pool: Sequence[Mapping] = (), k_demos: int = 0, demo_strategy: str = "attributes",
                  demo_style: str = "turns") -> list[dict]:
    """n prompt items {"id", "task", "prompt", "input", "attributes", "demos", "seed"}; the same seed gives
    the same items. input_fn(attributes, rng) → the input of each (e.g. an unlabelled question)."""
    rng = random.Random(f"synth/prompts/{seed}")
    items = []
    for i, attrs in enumerate(grid.sample(n, seed)):
        x = input_fn(attrs, rng) if input_fn is not None else None
        if x is not None and not isinstance(x, str):
            raise TypeError(f"input_fn must return a string or None, got {type(x).__name__}")
        demos = select_demos(demo_pool, k_demos, rng, attributes=attrs, query=x, strategy=demo_strategy)
        items.append({"id": f"p{i:06d}", "task": spec.name, "prompt": render_prompt(spec, attrs, demos, x,
                                                                                       style=demo_style),
                      "input": x, "attributes": dict(attrs), "demos": [d.get("id") for d in demos], "seed": seed})
    return items


# ----------------------------------------------------------------------------------------------
# 4. Generation by a teacher

class LMTeacher:
    """An ElleciLM (or anything with its generation interface) + tokenizer; k samples per prompt in
    batches (`sampling.sample_responses`), or greedy (`temperature=0`, then k must be 1). `stop_pattern`
    (a regex) cuts each output at the end of its first match, like an API's stop sequence (a text without
    a match is kept whole)."""

    def __init__(self, model, tokenizer, *, name: str = "elleci", temperature: float = 1.0,
                 top_p: float | None = None, top_k: int | None = None, max_new_tokens: int = 64,
                 batch_size: int = 64, chat: bool = True, stop_pattern: str | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.stop = re.compile(stop_pattern) if stop_pattern else None
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.batch_size, self.chat = max_new_tokens, batch_size, chat

    def cut(self, text: str) -> str:
        """The text up to the end of the first stop match (whole when none)."""
        m = self.stop.search(text) if self.stop is not None else None
        return text[:m.end()] if m else text

    def __call__(self, prompts: Sequence, k: int = 1, seed: int = 0) -> list[list[str]]:
        if self.temperature == 0:
            if k != 1:
                raise ValueError("a greedy teacher (temperature 0) gives one output per prompt: use k=1")
            ids = prompt_ids(self.tokenizer, prompts, chat=self.chat)
            groups = [[t] for t in complete(self.model, self.tokenizer, ids, max_new_tokens=self.max_new_tokens,
                                            temperature=0.0, batch_size=self.batch_size)]
        else:
            groups = sample_responses(self.model, self.tokenizer, prompts, k=k, temperature=self.temperature,
                                      top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
                                      seed=seed, batch_size=self.batch_size, chat=self.chat)
        return [[self.cut(t) for t in g] for g in groups]


class CallableTeacher:
    """A user-supplied fn(prompts) → texts (one per prompt; e.g. an external model). For k > 1 every prompt
    is repeated k times in one call (prompt-major); fn may accept `seed=` too."""

    def __init__(self, fn: Callable[..., Sequence[str]], name: str | None = None, *, pass_seed: bool = False):
        if not callable(fn):
            raise TypeError(f"CallableTeacher needs a callable, got {type(fn).__name__}")
        self.fn, self.pass_seed = fn, pass_seed
        self.name = name or getattr(fn, "__name__", "callable")

    def __call__(self, prompts: Sequence, k: int = 1, seed: int = 0) -> list[list[str]]:
        repeated = [p for p in prompts for _ in range(k)]
        texts = list(self.fn(repeated, seed=seed) if self.pass_seed else self.fn(repeated))
        if len(texts) != len(repeated) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"teacher {self.name!r} must return {len(repeated)} strings, got {len(texts)} "
                             f"items of types {sorted({type(t).__name__ for t in texts})}")
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def generate(items: Sequence[Mapping], teacher, *, k: int = 1, seed: int = 0) -> list[dict]:
    """k outputs per prompt item → records with provenance (see the module docstring). `teacher` is an
    `LMTeacher`, a `CallableTeacher` or a bare callable prompts → texts (wrapped)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not isinstance(teacher, (LMTeacher, CallableTeacher)):
        teacher = CallableTeacher(teacher)
    groups = teacher([it["prompt"] for it in items], k=k, seed=seed) if items else []
    if len(groups) != len(items) or any(len(g) != k for g in groups):
        raise ValueError(f"teacher {teacher.name!r} returned a wrong number of outputs")
    return [{"id": f"{it['id']}-s{j}", "prompt_id": it["id"], "task": it["task"], "teacher": teacher.name,
             "prompt": it["prompt"], "input": it["input"], "attributes": dict(it["attributes"]),
             "demos": list(it["demos"]), "seed": {"prompts": it["seed"], "generation": seed}, "sample": j,
             "output": text, "filters_passed": [], "scores": {}}
            for it, group in zip(items, groups) for j, text in enumerate(group)]


# ----------------------------------------------------------------------------------------------
# Output

def _check_record(r, where: str) -> None:
    if not isinstance(r, Mapping):
        raise ValueError(f"{where}: a record must be a dict, got {type(r).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in r]
    if missing:
        raise ValueError(f"{where}: record lacks the provenance fields {missing}")
    if not isinstance(r["output"], str):
        raise ValueError(f"{where}: field 'output' must be a string, got {type(r['output']).__name__}")


def write_records(path, records: Sequence[Mapping]) -> Path:
    """Write records as JSONL atomically after checking every provenance field is present."""
    for i, r in enumerate(records):
        _check_record(r, f"record {i}")
    write_jsonl(path, [dict(r) for r in records])
    return Path(path)


def read_records(path) -> list[dict]:
    """Records written by `write_records`; a line without the provenance fields raises ValueError(path:line)."""
    out = []
    for lineno, rec in read_jsonl(path):
        _check_record(rec, f"{path}:{lineno}")
        out.append(rec)
    return out


def synthesize(items: Sequence[Mapping], teacher, filters: Sequence[Filter] = (), *, k: int = 1, seed: int = 0,
               out_dir=None) -> tuple[list[dict], list[dict], list[dict]]:
    """Generate then filter: (kept, rejected, per-filter stats). With out_dir, writes kept.jsonl and
    rejected.jsonl there (atomically)."""
    kept, rejected, stats = apply_filters(generate(items, teacher, k=k, seed=seed), filters)
    if out_dir is not None:
        write_records(Path(out_dir) / "kept.jsonl", kept)
        write_records(Path(out_dir) / "rejected.jsonl", rejected)
    return kept, rejected, stats
