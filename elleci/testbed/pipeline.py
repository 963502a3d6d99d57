"""The author's roadmap (phase 2A/2B) on the arithmetic task, one function per stage, small enough for a CPU:

    base      a tokenizer and a small Elleci pretrained on plain text (generated corpus + worked sums)
    SFT       LoRA instruction tuning on ChatML conversations (loss on assistant tokens only)
    DPO       from the SFT model: pairs (correct solution, plausible wrong one), reference = SFT model
    UNA       from the SFT model: thumbs up/down (binary) or graded scores, reference = SFT model
    control   from the SFT model: the same number of further SFT steps (what DPO/UNA must beat to show
              that the preference signal, not just more training, helps)
    eval      greedy decoding on held-out problems, exact-answer accuracy

The examples (`examples/pipeline.py`, `sft.py`, `dpo.py`, `una.py`) are thin command lines over these
functions; every stage uses only the library (`elleci.algos`, `elleci.model.lora`). DPO and UNA keep
training the SFT adapter, with the SFT model's log-probs precomputed once as the reference, and by
default add an NLL term on the chosen / desired answers (`nll_weight`, RPO, arXiv 2404.19733): without it,
on this task, both losses lowered the chosen answers' likelihood and held-out accuracy fell below SFT's
(seed 0: DPO 0.253 → 0.163, UNA-binary 0.253 → 0.230 at lr 2e-4, 60 steps).

Settings come in three sections, and each function takes only those it uses:

    BaseConfig        the base (its cache key), the problems, seed, device, logging, evaluation length
    SFTConfig         the LoRA adapter and the SFT stage            run_sft(cfg, sft, model, tok, train)
    PreferenceConfig  DPO / UNA / the SFT control                   run_dpo(cfg, pref, model, tok, train)

    cfg = BaseConfig(seed=0, **QUICK["base"])                        # QUICK: per-section smoke-run overrides
    train, test = problems(cfg)
    model, tok = cached_base(cfg, train, "out/bases")
    run_sft(cfg, SFTConfig(), model, tok, train)
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from elleci._checks import (check_bool, check_choice, check_int, check_modules, check_number, check_str, fail,
                            is_int)
from elleci._io import write_json_atomic
from elleci.algos.alignment.dpo import dpo_loss
from elleci.algos.loop import sample_batches, train_loop
from elleci.algos.preference import (collate_fn, encode_feedback, encode_pairs, feedback_step, pairwise_step,
                                precompute_reference)
from elleci.algos.alignment.rlaif import PairwiseTemplate, pairwise_prompt
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.algos.alignment.una import una_binary_loss, una_score_loss
from elleci.data import pack_documents
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.tokenizer import render_chat
from elleci.model.lora import LoraConfig, apply_lora, load_adapter
from elleci.tasks import arithmetic, lexicon, translation
from elleci.tasks.corpus import synthetic_corpus
from elleci.testbed.completion import completer


@dataclass(frozen=True)
class BaseConfig:
    """The small pretrained base (tokenizer + Elleci pretrained on generated text), the problems, and the
    settings every stage shares: seed, device, logging, the evaluation's decoding length. The fields of
    BASE_FIELDS key the base's cache (`base_key`)."""
    seed: int = 0
    levels: tuple[int, ...] = (1, 3)     # one-digit steps: held-out questions compose facts seen in training
    n_train: int = 3000                  # training problems (pretraining text, SFT, preference data)
    n_eval: int = 300                    # held-out problems
    vocab_size: int = 384
    d_model: int = 128
    n_layers: int = 4
    pretrain_steps: int = 250
    pretrain_lr: float = 3e-3
    seq_len: int = 64
    batch_size: int = 32                 # pretraining batch size
    lexicon: bool = False                # add the IT-EN lexicon's sentences to pretraining (word translation)
    max_new_tokens: int = 32             # greedy evaluation's response cap
    device: str = "cpu"
    log_every: int = 20

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "seed", self.seed)
        if not (isinstance(self.levels, (tuple, list)) and self.levels
                and all(is_int(lv) and lv in arithmetic.LEVELS for lv in self.levels)):
            fail(name, "levels", f"a non-empty tuple of levels from {arithmetic.LEVELS}", self.levels)
        for field in ("n_train", "n_eval", "vocab_size", "d_model", "n_layers", "pretrain_steps", "batch_size",
                      "max_new_tokens", "log_every"):
            check_int(name, field, getattr(self, field), ge=1)
        check_int(name, "seq_len", self.seq_len, ge=2)
        check_number(name, "pretrain_lr", self.pretrain_lr, gt=0)
        check_bool(name, "lexicon", self.lexicon)
        check_str(name, "device", self.device, empty=False)


@dataclass(frozen=True)
class SFTConfig:
    """The pipeline's SFT stage: a LoRA adapter (r, alpha, target modules) instruction-tuned on worked
    solutions, plus `judge_examples` pairwise-judging conversations (RLAIF's self-labeler)."""
    lora_r: int = 16
    lora_alpha: float = 32.0
    target_modules: list[str] | str = "all-linear"
    steps: int = 120
    lr: float = 3e-3
    batch_size: int = 32
    judge_examples: int = 0              # pairwise-judging conversations mixed into SFT (RLAIF's self-labeler)

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "lora_r", self.lora_r, ge=1)
        check_number(name, "lora_alpha", self.lora_alpha, gt=0)
        check_modules(name, "target_modules", self.target_modules)
        check_int(name, "steps", self.steps, ge=1)
        check_number(name, "lr", self.lr, gt=0)
        check_int(name, "batch_size", self.batch_size, ge=1)
        check_int(name, "judge_examples", self.judge_examples, ge=0)

    def lora_config(self) -> LoraConfig:
        """The adapter's layout (also used by the examples that train their own LoRA from the base)."""
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=self.target_modules)


@dataclass(frozen=True)
class PreferenceConfig:
    """The preference stages from the SFT model (DPO, UNA, and the SFT control for the same steps, lr and
    batch size)."""
    steps: int = 60
    lr: float = 2e-4
    batch_size: int = 16
    beta: float = 0.1                    # DPO's β
    una_kind: str = "binary"             # "binary" (thumbs up/down, MSE on σ(r)) or "score"
    una_beta: float = 0.1
    nll_weight: float = 1.0              # α·NLL on chosen / desired responses (RPO); 0 = the papers' plain losses

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "steps", self.steps, ge=1)
        check_number(name, "lr", self.lr, gt=0)
        check_int(name, "batch_size", self.batch_size, ge=1)
        check_number(name, "beta", self.beta, gt=0)
        check_choice(name, "una_kind", self.una_kind, UNA_KINDS)
        check_number(name, "una_beta", self.una_beta, gt=0)
        check_number(name, "nll_weight", self.nll_weight, ge=0)


UNA_KINDS = ("binary", "score")

QUICK = {"base": dict(n_train=200, n_eval=20, vocab_size=384, d_model=32, n_layers=2, pretrain_steps=3, seq_len=32,
                      batch_size=4, max_new_tokens=8, log_every=1),
         "sft": dict(steps=2, batch_size=4),
         "preference": dict(steps=2, batch_size=2)}
"""Overrides, per section, for a seconds-long smoke run of every stage (the examples' --quick, used by the
tests): `BaseConfig(**QUICK["base"])`, `replace(sft, **QUICK["sft"])`."""


def problems(cfg: BaseConfig) -> tuple[list, list]:
    """(train, held-out) problems: disjoint questions, deterministic in the seed."""
    train = arithmetic.make_problems(cfg.n_train, seed=cfg.seed, levels=cfg.levels, split="train")
    test = arithmetic.make_problems(cfg.n_eval, seed=cfg.seed + 1000, levels=cfg.levels, split="test")
    return train, test


def pretraining_texts(cfg: BaseConfig, train) -> list[str]:
    """Generated bilingual prose plus the training problems written out as plain text (plus, with
    `cfg.lexicon`, sentences stating every pair of the IT-EN lexicon: the word-translation task's knowledge)."""
    worked = [f"{p.question}\n{p.solution}" for p in train]
    prose = synthetic_corpus(len(worked), seed=cfg.seed)
    texts = worked + prose
    if cfg.lexicon:
        texts += translation.pretraining_texts(lexicon.PAIRS, seed=cfg.seed)
    random.Random(cfg.seed).shuffle(texts)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """SentencePiece on `texts` plus one rendered chat (so the template's words are pieces); digits split,
    so each digit has one token whatever surrounds it."""
    chat = render_chat([{"role": "user", "content": "1 + 2 = ?"}, {"role": "assistant", "content": "Answer: 3"}])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "text.txt"
        lines = [t.replace("\n", " ") for t in texts] + [chat.replace("\n", " ")] * 50
        path.write_text("\n".join(lines), encoding="utf-8")
        return Tokenizer.train(path, vocab_size=vocab_size, split_digits=True)


def pretrain_base(cfg: BaseConfig, tok: Tokenizer, texts: list[str], print_fn=print) -> ElleciLM:
    """A small Elleci (the `small` preset's layout, shrunk) trained on packed `texts` with the LM loss."""
    torch.manual_seed(cfg.seed)
    config = ElleciConfig.from_name("small", d_model=cfg.d_model, n_layers=cfg.n_layers, vocab_size=tok.vocab_size,
                                    n_heads=4, kv_lora_rank=32, mamba_heads=4)
    model = ElleciLM(config).to(cfg.device)
    stream = pack_documents([tok.encode(t) for t in texts], eos_id=tok.eos_id)
    n = (stream.numel() - 1) // cfg.seq_len
    rows = stream[: n * cfg.seq_len].view(n, cfg.seq_len)
    items = [(r.tolist(), r.tolist()) for r in rows]                  # every token scored
    batches = sample_batches(items, cfg.batch_size, cfg.seed, sft_collate(tok.pad_id))
    train_loop(model, batches, sft_step, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, weight_decay=0.1,
               log_every=cfg.log_every, print_fn=print_fn)
    return model


def build_base(cfg: BaseConfig, train, print_fn=print) -> tuple[ElleciLM, Tokenizer]:
    """Tokenizer + pretrained base from the generated corpus and the training problems' worked text."""
    texts = pretraining_texts(cfg, train)
    tok = build_tokenizer(texts, cfg.vocab_size)
    return pretrain_base(cfg, tok, texts, print_fn=print_fn), tok


BASE_FIELDS = ("seed", "levels", "n_train", "vocab_size", "d_model", "n_layers", "pretrain_steps", "pretrain_lr",
               "seq_len", "batch_size", "lexicon")
"""The BaseConfig fields that determine the base model (the key of `cached_base`)."""


def base_key(cfg: BaseConfig) -> str:
    """A short stable name for the base that `cfg` builds: seed plus a hash of the BASE_FIELDS."""
    fields = {k: v for k, v in asdict(cfg).items() if k in BASE_FIELDS}
    if not fields["lexicon"]:
        del fields["lexicon"]                                # keys of bases made before the field existed
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return f"seed{cfg.seed}-{digest}"


def cached_base(cfg: BaseConfig, train, cache_dir=None, print_fn=print) -> tuple[ElleciLM, Tokenizer]:
    """`build_base`, saved under cache_dir/<base_key> and loaded from there when present (pretraining is
    most of an example's CPU time; every example of a seed shares one base). cache_dir=None: no cache."""
    if cache_dir is None:
        return build_base(cfg, train, print_fn=print_fn)
    directory = Path(cache_dir) / base_key(cfg)
    if (directory / "cache.json").is_file():               # written last: the base is complete
        print_fn(f"base: loaded from {directory}")
        return ElleciLM.from_pretrained(directory).to(cfg.device), Tokenizer.load(directory)
    model, tok = build_base(cfg, train, print_fn=print_fn)
    model.save_pretrained(directory, tokenizer=tok)
    write_json_atomic(directory / "cache.json", {k: v for k, v in asdict(cfg).items() if k in BASE_FIELDS})
    print_fn(f"base: saved to {directory}")
    return model, tok


def load_stage(directory, device: str = "cpu") -> tuple[ElleciLM, Tokenizer]:
    """A stage saved by the examples: DIR/base (model + tokenizer) plus DIR/adapter (LoRA) if present,
    or DIR/model (full fine-tuning)."""
    directory = Path(directory)
    model_dir = directory / "model" if (directory / "model").is_dir() else directory / "base"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{directory}: expected base/ (+ adapter/) or model/ written by examples/sft.py")
    model, tok = ElleciLM.from_pretrained(model_dir).to(device), Tokenizer.load(model_dir)
    if model_dir.name == "base" and (directory / "adapter").is_dir():
        load_adapter(model, directory / "adapter")
    return model.eval(), tok


JUDGE_TEMPLATE = PairwiseTemplate(preamble="Which response is right?")
"""The short pairwise template the pipeline's self-labeler is trained on (RLAIF's "base" preamble)."""


def judge_conversations(problems, seed: int, template: PairwiseTemplate = JUDGE_TEMPLATE) -> list[list[dict]]:
    """Pairwise-judging SFT conversations: the four-part prompt over a right and a plausible wrong
    solution, in random order, answered "1" or "2" (the position of the right one)."""
    rng = random.Random(f"judge/{seed}")
    convs = []
    for p in problems:
        wrong = arithmetic.wrong_solution(p, rng)
        right_first = rng.random() < 0.5
        first, second = (p.solution, wrong) if right_first else (wrong, p.solution)
        convs.append([{"role": "user", "content": pairwise_prompt(template, p.question, first, second)},
                      {"role": "assistant", "content": "1" if right_first else "2"}])
    return convs


def run_sft(cfg: BaseConfig, sft: SFTConfig, model: ElleciLM, tok: Tokenizer, train, print_fn=print) -> list[dict]:
    """Apply LoRA and instruction-tune on the training problems' worked solutions (plus, when
    `sft.judge_examples` > 0, that many pairwise-judging conversations: the RLAIF self-labeler's skill)."""
    apply_lora(model, sft.lora_config())
    conversations = arithmetic.sft_examples(train)
    if sft.judge_examples:
        rng = random.Random(f"judge-problems/{cfg.seed}")
        conversations += judge_conversations(rng.choices(train, k=sft.judge_examples), cfg.seed)
    examples = encode_sft(tok, conversations)
    batches = sample_batches(examples, sft.batch_size, cfg.seed + 1, sft_collate(tok.pad_id))
    return train_loop(model, batches, sft_step, steps=sft.steps, lr=sft.lr, log_every=cfg.log_every,
                      print_fn=print_fn)


def run_sft_control(cfg: BaseConfig, pref: PreferenceConfig, model: ElleciLM, tok: Tokenizer, train,
                    print_fn=print) -> list[dict]:
    """The control for DPO/UNA: keep SFT-training the adapter for the same steps, lr and batch size."""
    examples = encode_sft(tok, arithmetic.sft_examples(train))
    batches = sample_batches(examples, pref.batch_size, cfg.seed + 4, sft_collate(tok.pad_id))
    return train_loop(model, batches, sft_step, steps=pref.steps, lr=pref.lr, log_every=cfg.log_every,
                      print_fn=print_fn)


def run_dpo(cfg: BaseConfig, pref: PreferenceConfig, model: ElleciLM, tok: Tokenizer, train, loss_fn=dpo_loss,
            print_fn=print, **loss_kw) -> list[dict]:
    """Keep training the SFT adapter with a pairwise loss; the reference (the SFT model) is precomputed."""
    items = encode_pairs(tok, arithmetic.preference_pairs(train, seed=cfg.seed))
    precompute_reference(model, items, pad_token_id=tok.pad_id)
    batches = sample_batches(items, pref.batch_size, cfg.seed + 2, collate_fn("pairs", tok.pad_id))
    step = pairwise_step(loss_fn, reference="precomputed", nll_weight=pref.nll_weight, beta=pref.beta, **loss_kw)
    return train_loop(model, batches, step, steps=pref.steps, lr=pref.lr, log_every=cfg.log_every,
                      print_fn=print_fn)


def run_una(cfg: BaseConfig, pref: PreferenceConfig, model: ElleciLM, tok: Tokenizer, train,
            print_fn=print) -> list[dict]:
    """UNA from the SFT model: binary thumbs up/down (MSE on σ(r)) or graded scores (MSE on σ(r))."""
    if pref.una_kind == "binary":
        records, target = arithmetic.binary_feedback(train, seed=cfg.seed), "label"
        step = feedback_step(una_binary_loss, nll_weight=pref.nll_weight, beta=pref.una_beta, kind="mse")
    else:                                                    # "score" (PreferenceConfig checks una_kind)
        records, target = arithmetic.scored_feedback(train, seed=cfg.seed), "score"
        step = feedback_step(una_score_loss, nll_weight=pref.nll_weight, beta=pref.una_beta)
    items = encode_feedback(tok, records, target)
    precompute_reference(model, items, pad_token_id=tok.pad_id)
    batches = sample_batches(items, pref.batch_size, cfg.seed + 3, collate_fn("feedback", tok.pad_id))
    return train_loop(model, batches, step, steps=pref.steps, lr=pref.lr, log_every=cfg.log_every,
                      print_fn=print_fn)


def evaluate(cfg: BaseConfig, model: ElleciLM, tok: Tokenizer, test) -> dict:
    return arithmetic.evaluate(completer(model, tok), test, max_new_tokens=cfg.max_new_tokens)


def resumable_seeds(args, run_seed, print_fn=print, skip: tuple = ("seeds", "out")) -> list:
    """`run_seed(args, seed)` for each of args.seeds, each result saved as it ends to
    OUT/seed<k>/result.json beside the settings (vars(args) without `skip`). A rerun with the same settings
    loads a finished seed instead of running it again, so a long multi-seed run that is cut off resumes."""
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    results = []
    for seed in args.seeds:
        path = Path(args.out) / f"seed{seed}" / "result.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == json.loads(json.dumps(settings)):
                print_fn(f"seed {seed}: result loaded from {path} (delete it to run the seed again)")
                results.append(saved["result"])
                continue
        results.append(run_seed(args, seed))
        write_json_atomic(path, {"result": results[-1], "settings": settings})
    return results


def prefixed_tables(results: list[dict], tables) -> str:
    """The examples' printed tables. Each per-seed result holds "<prefix>/<row name>": value entries; for each
    (prefix, title) of `tables`: the title, then `seed_table` of that prefix's rows (a row missing on some
    seed shows n/a there). Prefixes with no entry on any seed are left out."""
    blocks = []
    for prefix, title in tables:
        rows = [{"seed": r["seed"], **{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(prefix + "/")}}
                for r in results]
        if any(len(row) > 1 for row in rows):
            blocks.append(f"{title}\n{seed_table(rows)}")
    return "\n\n".join(blocks)


def seed_table(results: list[dict], label: str = "") -> str:
    """Markdown table of per-seed results ({"seed": s, name: value, ...}): one row per name (every name of any
    seed, except "seed" and "seconds"), one column per seed, then mean ± std. Names containing "pairs" are
    counts. A missing or NaN value (e.g. a precision over nothing kept) is written "n/a" and left out of the
    mean, which then says over how many seeds it is."""
    names = list(dict.fromkeys(k for r in results for k in r if k not in ("seed", "seconds")))
    lines = [f"| {label} | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean ± std |",
             "|---|" + "---|" * (len(results) + 1)]
    for name in names:
        vals = [r.get(name, math.nan) for r in results]
        fmt = (lambda v: f"{v:.0f}") if "pairs" in name else (lambda v: f"{v:.3f}")
        known = [v for v in vals if not math.isnan(v)]
        cells = " | ".join("n/a" if math.isnan(v) else fmt(v) for v in vals)
        if not known:
            summary = "n/a"
        else:
            sd = statistics.stdev(known) if len(known) > 1 else 0.0
            summary = f"{fmt(statistics.mean(known))} ± {sd:.3f}"
            if len(known) < len(vals):
                summary += f" ({len(known)} of {len(vals)} seeds)"
        lines.append(f"| {name} | {cells} | {summary} |")
    return "\n".join(lines)