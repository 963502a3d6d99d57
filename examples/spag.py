"""SPAG on a CPU: imitation of a scripted Adversarial Taboo player, then three epochs of self-play (SPAG-1..3).

    python examples/spag.py --quick --cache ''                           # seconds: smoke test
    python examples/spag.py --seeds 0 1 2 --out out/spag                 # the full run (cached pipeline bases)
    python examples/spag.py --reference previous                         # SPAG-2/3 reference = previous model

Per seed, from the pipeline's cached pretrained base (`cached_base`, default BaseConfig):

    imitation   LoRA SFT (SFTwithKL with --imitation-kl; default 0 = plain SFT, no reference forward) on
                scripted taboo games (both roles, every utterance) mixed with the arithmetic SFT data (8 game +
                16 arithmetic samples per step), so the model also solves sums
    SPAG-k      self-play: the current model plays both roles (T = 1.2, 5 turns), winners' utterances get
                decayed rewards (γ 0.8) and role weights, OfflinePO (λ_KL 0.2, ε 0.2) + λ_SFT 0.5 · SFT on the
                arithmetic data; reference = the imitation model (--reference imitation) or the previous one
    control     from the imitation weights, the same optimizer steps per epoch with the SFT half only (no game
                data): what the arithmetic accuracy does with the extra SFT alone

After imitation and each epoch: win rates against the fixed scripted opponent (greedy decoding; as attacker
vs the scripted defender, as defender vs the scripted attacker), tie rate (both seats), attacker rule breaks,
and held-out arithmetic accuracy (`pipeline.evaluate` on the first --eval-problems problems). Writes
OUT/results.json (per seed: every number, self-play statistics, sample games), OUT/seed<k>/imitation.pt (the
trained parameters after imitation), OUT/seed<k>/result.json as each seed ends (a rerun with the same --out
loads finished seeds instead of redoing them) and prints tables over seeds.

Choices forced by the CPU scale (each is a flag):
- The output layer is trained with the adapters (PEFT's modules_to_save=["lm_head"]). The base never saw the
  chat tokens in pretraining: with LoRA alone, p(<|im_end|>) after a finished utterance stayed ≈ 0.04, so
  sampled utterances never ended and self-play at T = 1.2 was noise (greedy decoding hid it); training the
  head brings it to ≈ 0.998. --frozen-head restores adapters-only training. (With a trained head,
  "adapters disabled" is not the base model any more: use --imitation-kl only with --frozen-head.)
- Targets: --words corpus, the 15 word pairs of the pretraining corpus in both languages (30 targets; the base
  has read "In Italian dog is cane."); --words all uses every taboo target (146).
- Queries carry no rules text (--rules ''): the base's tokenizer spends about one token per character, and
  the rules are the same in every game.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from elleci._io import atomic_path, write_json_atomic
from elleci.algos.alignment.iterative_dpo import trainable_state
from elleci.algos.loop import train_loop
from elleci.algos.reasoning.spag import (SPAGConfig, encode_sft_items, imitation_step, mixed_batches, run_spag, spag_step)
from elleci.algos.reasoning.spag_play import ModelPlayer, play_games
from elleci.model.lora import apply_lora
from elleci.algos.reasoning import taboo
from elleci.tasks import arithmetic, corpus
from elleci.testbed.pipeline import (QUICK, BaseConfig, SFTConfig, cached_base, evaluate, prefixed_tables, problems,
                                     resumable_seeds)

QUICK_ARGS = dict(imitation_games=6, imitation_steps=2, game_batch_size=2, sft_batch_size=2, epochs=1, games=4,
                  eval_games=2, eval_problems=4, max_new_tokens=4, log_every=1)
"""Overrides of --quick (with the pipeline's QUICK base): a seconds-long smoke run of every stage."""
TABLES = (("attacker win", "win rate as attacker vs the scripted defender (greedy)"),
          ("defender win", "win rate as defender vs the scripted attacker (greedy)"),
          ("tie", "tie rate (both seats)"), ("rule break", "attacker rule breaks vs the scripted defender"),
          ("arithmetic", "held-out arithmetic accuracy (greedy)"),
          ("self-play", "self-play games of each epoch: fraction won by the attacker / the defender"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--imitation-games", type=int, default=600, help="scripted games for the imitation data")
    ap.add_argument("--imitation-steps", type=int, default=100)
    ap.add_argument("--imitation-lr", type=float, default=3e-3)
    ap.add_argument("--imitation-kl", type=float, default=0.0,
                    help="λ_KL of SFTwithKL (the paper: 0.1; 0 = plain SFT, no reference forward: the CPU default)")
    ap.add_argument("--words", default="corpus", choices=["corpus", "all"],
                    help="targets: the 15 pairs of the pretraining corpus (both languages: 30 targets; the base has "
                         "read their translations) or every taboo.TARGETS word")
    ap.add_argument("--game-batch-size", type=int, default=8, help="game samples per step (imitation and SPAG)")
    ap.add_argument("--sft-batch-size", type=int, default=16, help="arithmetic SFT samples per step")
    ap.add_argument("--epochs", type=int, default=3, help="SPAG epochs")
    ap.add_argument("--games", type=int, default=48, help="self-play games per epoch")
    ap.add_argument("--spag-lr", type=float, default=1e-3)
    ap.add_argument("--passes", type=float, default=2.0, help="SPAG steps = passes · samples / game batch size")
    ap.add_argument("--kl-coeff", type=float, default=0.2)
    ap.add_argument("--sft-coeff", type=float, default=0.5)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=1.2, help="self-play sampling")
    ap.add_argument("--reference", default="imitation", choices=["imitation", "previous"])
    ap.add_argument("--rules", default="", help="rules in the queries: full, short, '' (none: the CPU default, "
                    "as each character costs about one token with the base's tokenizer) or a text")
    ap.add_argument("--max-new-tokens", type=int, default=30,
                    help="per utterance (a guess of the longest corpus target is 28 tokens + <|im_end|>)")
    ap.add_argument("--eval-games", type=int, default=24, help="games per seat against the scripted player")
    ap.add_argument("--eval-problems", type=int, default=150)
    ap.add_argument("--no-control", action="store_true", help="skip the SFT-only control")
    ap.add_argument("--frozen-head", action="store_true",
                    help="train the LoRA adapters only (default: the output layer too, see the module docstring)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="out/bases", help="where pretrained bases are kept ('' = no cache)")
    ap.add_argument("--out", default="out/spag")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK_ARGS)
    return args


def game_targets(words: str) -> list:
    """The targets of --words: every taboo target, or those whose pair is in the pretraining corpus."""
    if words == "all":
        return list(taboo.TARGETS)
    pairs = set(corpus.WORDS)
    return [t for t in taboo.TARGETS
            if ((t.translation, t.word) if t.lang == "en" else (t.word, t.translation)) in pairs]


def evaluate_stage(args, cfg, model, tok, test, stage: str, row: dict, print_fn=print) -> list:
    """Greedy games against the scripted player in both seats + arithmetic; numbers into `row`."""
    t0 = time.time()
    targets = random.Random("spag-eval").choices(game_targets(args.words), k=args.eval_games)
    greedy = ModelPlayer(model, tok, temperature=0.0, max_new_tokens=args.max_new_tokens, rules=args.rules)
    as_att = play_games(greedy, taboo.ScriptedPlayer(seed=10), [taboo.Game(t) for t in targets])
    as_def = play_games(taboo.ScriptedPlayer(seed=11), greedy, [taboo.Game(t) for t in targets])
    r_att, r_def = taboo.outcome_rates(as_att), taboo.outcome_rates(as_def)
    row[f"attacker win/{stage}"] = r_att["attacker_win"]
    row[f"defender win/{stage}"] = r_def["defender_win"]
    row[f"tie/{stage}"] = (r_att["tie"] + r_def["tie"]) / 2
    row[f"rule break/{stage}"] = r_att["rule_break"]
    row[f"arithmetic/{stage}"] = evaluate(cfg, model, tok, test[: args.eval_problems])["accuracy"]
    print_fn(f"seed {cfg.seed} | {stage} | " + " | ".join(
        f"{k.split('/')[0]} {v:.3f}" for k, v in row.items() if k.endswith("/" + stage))
        + f" | evaluated in {time.time() - t0:.0f}s")
    return as_att[:2] + as_def[:2]


def run_seed(args, seed: int, print_fn=print) -> dict:
    t0, c0 = time.time(), time.process_time()
    cfg = BaseConfig(seed=seed, device=args.device, **(QUICK["base"] if args.quick else {}))
    train, test = problems(cfg)
    model, tok = cached_base(cfg, train, cache_dir=args.cache or None, print_fn=print_fn)
    torch.manual_seed(seed)                              # the LoRA init (a cached base skips pretraining's seeding)
    apply_lora(model, SFTConfig().lora_config())           # the pipeline's adapter layout
    model.lm_head.weight.requires_grad_(not args.frozen_head)
    row, extra = {"seed": seed}, {"samples": {}, "self_play": {}}

    # imitation: scripted games (both roles) + arithmetic SFT
    rng, scripted = random.Random(f"spag-imitation/{seed}"), taboo.ScriptedPlayer(seed=seed)
    targets = game_targets(args.words)
    games = [taboo.play_scripted(taboo.Game(rng.choice(targets)), scripted) for _ in range(args.imitation_games)]
    game_items = encode_sft_items(tok, taboo.imitation_conversations(games, rules=args.rules))
    sft_items = encode_sft_items(tok, arithmetic.sft_examples(train))
    gbs, sbs = args.game_batch_size, args.sft_batch_size
    print_fn(f"seed {seed} | imitation data: {len(games)} scripted games ({taboo.outcome_rates(games)}) -> "
             f"{len(game_items)} utterances, {len(sft_items)} arithmetic examples")
    batches = mixed_batches(game_items, sft_items, game_batch_size=gbs, sft_batch_size=sbs, seed=seed,
                            pad_token_id=tok.pad_id)
    train_loop(model, batches, imitation_step(reference="adapters", kl_coeff=args.imitation_kl),
               steps=args.imitation_steps, lr=args.imitation_lr, log_every=args.log_every, print_fn=print_fn)
    t_imit = time.time()
    extra["samples"]["imitation"] = _show(evaluate_stage(args, cfg, model, tok, test, "imitation", row, print_fn))
    imitation_state = trainable_state(model)
    with atomic_path(Path(args.out) / f"seed{seed}" / "imitation.pt") as tmp:
        torch.save(imitation_state, tmp)

    # SPAG-1..k
    spag_cfg = SPAGConfig(games=args.games, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          rules=args.rules, kl_coeff=args.kl_coeff, sft_coeff=args.sft_coeff, clip=args.clip,
                          reference_policy=args.reference, lr=args.spag_lr, passes=args.passes, game_batch_size=gbs,
                          sft_batch_size=sbs, log_every=args.log_every)

    def eval_fn(m, epoch):
        return _show(evaluate_stage(args, cfg, m, tok, test, f"SPAG-{epoch}", row, print_fn))
    epochs = run_spag(model, tok, targets, sft_items, spag_cfg, epochs=args.epochs, seed=seed,
                      eval_fn=eval_fn, print_fn=print_fn)
    steps = []
    for e in epochs:
        s = e["stats"]
        row[f"self-play/attacker wins SPAG-{e['epoch']}"] = s["attacker_wins"] / s["games"]
        row[f"self-play/defender wins SPAG-{e['epoch']}"] = s["defender_wins"] / s["games"]
        extra["self_play"][f"SPAG-{e['epoch']}"] = s
        extra["samples"][f"SPAG-{e['epoch']}"] = e["eval"]
        extra["samples"][f"self-play SPAG-{e['epoch']}"] = _show(e["games"][:3])
        steps.append(e["history"][-1]["step"] + 1 if e["history"] else 0)
    t_spag = time.time()

    # control: the same steps per epoch with the arithmetic SFT part only, from the imitation weights
    if not args.no_control:
        _load(model, imitation_state)
        for epoch, n in enumerate(steps, start=1):
            if n:
                train_loop(model, mixed_batches([], sft_items, game_batch_size=0, sft_batch_size=sbs,
                                                seed=seed * 100 + epoch, pad_token_id=tok.pad_id),
                           spag_step(sft_coeff=args.sft_coeff), steps=n, lr=args.spag_lr, log_every=args.log_every,
                           print_fn=print_fn)
        row["arithmetic/SFT-only control"] = evaluate(cfg, model, tok, test[: args.eval_problems])["accuracy"]
        print_fn(f"seed {seed} | SFT-only control ({sum(steps)} steps) | arithmetic "
                 f"{row['arithmetic/SFT-only control']:.3f}")
    row["seconds"] = time.time() - t0
    extra["cpu_seconds"] = time.process_time() - c0        # ≈ the wall time on an idle core (1 thread)
    print_fn(f"seed {seed} | wall: imitation {t_imit - t0:.0f}s, SPAG + evaluations {t_spag - t_imit:.0f}s, "
             f"total {row['seconds']:.0f}s | CPU {extra['cpu_seconds']:.0f}s")
    return {"row": row, **extra}


def _load(model, state: dict) -> None:
    """Copy a `trainable_state` into the model for good."""
    params = dict(model.named_parameters())
    with torch.no_grad():                       # copy_ (not .data.copy_): bumps the version BitLinear caches on
        for n, t in state.items():
            params[n].copy_(t)


def _show(games) -> list[dict]:
    return [{"target": g.target.word, "lang": g.target.lang, "outcome": g.outcome, "history": g.history}
            for g in games]


def main(argv=None):
    args = parse_args(argv)
    per_seed = resumable_seeds(args, run_seed)             # OUT/seed<k>/result.json: a cut run resumes
    rows = [r["row"] for r in per_seed]
    print("\n" + prefixed_tables(rows, TABLES))
    print("\nseconds per seed (wall / CPU): " + ", ".join(f"{r['row']['seconds']:.0f} / {r['cpu_seconds']:.0f}"
                                                        for r in per_seed))
    write_json_atomic(Path(args.out) / "results.json", {"results": per_seed, "args": vars(args)})
    return rows


if __name__ == "__main__":
    main()
