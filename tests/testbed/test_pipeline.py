"""The pipeline's stage helpers: the base cache and the self-labeler's judging conversations."""
from dataclasses import fields, replace

import pytest
import torch

from elleci.algos.alignment.rlaif import PAIRWISE_TEMPLATES
from elleci.tasks import arithmetic
from elleci.testbed.pipeline import (JUDGE_TEMPLATE, QUICK, BaseConfig, PreferenceConfig, SFTConfig, base_key,
                                     cached_base, judge_conversations, problems)


def test_judge_conversations_answer_the_right_position():
    probs = arithmetic.make_problems(40, seed=3, levels=(1, 3))
    convs = judge_conversations(probs, seed=0)
    answers = [c[1]["content"] for c in convs]
    assert set(answers) == {"1", "2"} and 10 < answers.count("1") < 30       # both orders occur
    for p, (user, assistant) in zip(probs, convs):
        text = user["content"]
        assert text.startswith(JUDGE_TEMPLATE.preamble) and text.endswith(JUDGE_TEMPLATE.ending)
        first = text.split("Response 1: ")[1].split("\nResponse 2: ")[0]
        second = text.split("Response 2: ")[1].split("\nPreferred Response=")[0]
        right = first if assistant["content"] == "1" else second
        wrong = second if assistant["content"] == "1" else first
        assert arithmetic.verify(p, right) and not arithmetic.verify(p, wrong)
    assert judge_conversations(probs, seed=0) == convs
    it = judge_conversations(probs[:1], seed=0, template=PAIRWISE_TEMPLATES["it"])
    assert "Risposta preferita=" in it[0][0]["content"]


def test_cached_base_builds_once_then_loads(tmp_path):
    cfg = BaseConfig(seed=0, **QUICK["base"])
    train, _ = problems(cfg)
    printed = []
    built, tok = cached_base(cfg, train, tmp_path, print_fn=printed.append)
    loaded, tok2 = cached_base(cfg, train, tmp_path, print_fn=printed.append)
    assert any("saved to" in p for p in printed) and any("loaded from" in p for p in printed)
    assert tok2.encode("3 + 4 = ?") == tok.encode("3 + 4 = ?")
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), loaded.state_dict().values()))
    assert base_key(replace(cfg, pretrain_steps=4)) != base_key(cfg)        # a different base, another entry
    assert base_key(replace(cfg, log_every=99, max_new_tokens=3, n_eval=7, device="meta")) == base_key(cfg)
    # ... settings that do not build the base do not matter (the SFT's are not in BaseConfig at all)


# base_key of the old catch-all PipelineConfig(seed=s, lexicon=lex), with its QUICK overrides or not, computed by the
# code before the config was split into sections (commit 18bd79a): bases cached on disk keep their directory.
OLD_KEYS = {(0, False, False): "seed0-c93803de9a", (0, False, True): "seed0-34f4c705d8",
            (0, True, False): "seed0-3e531a7d41", (0, True, True): "seed0-4dc99ad3c9",
            (1, False, False): "seed1-18da7b27ec", (1, False, True): "seed1-4d03b1a2d4",
            (2, True, False): "seed2-c59b86dc12", (2, True, True): "seed2-f7ae6e7f3e"}


@pytest.mark.parametrize("seed, lexicon, quick", sorted(OLD_KEYS))
def test_base_key_is_the_one_of_the_old_pipeline_config(seed, lexicon, quick):
    cfg = BaseConfig(seed=seed, lexicon=lexicon, **(QUICK["base"] if quick else {}))
    assert base_key(cfg) == OLD_KEYS[seed, lexicon, quick]


def test_quick_overrides_are_fields_of_their_section():
    assert set(QUICK) == {"base", "sft", "preference"}
    for cls, name in ((BaseConfig, "base"), (SFTConfig, "sft"), (PreferenceConfig, "preference")):
        assert set(QUICK[name]) <= {f.name for f in fields(cls)}
        cls(**QUICK[name])                                                     # valid settings


def test_seed_table_rows_columns_and_counts():
    from elleci.testbed.pipeline import seed_table
    table = seed_table([{"seed": 0, "SFT": 0.1, "pairs": 10, "seconds": 5.0},
                        {"seed": 1, "SFT": 0.3, "pairs": 20, "seconds": 6.0}], "stage")
    lines = table.splitlines()
    assert lines[0] == "| stage | seed 0 | seed 1 | mean ± std |" and len(lines) == 4   # no "seconds" row
    assert lines[2] == "| SFT | 0.100 | 0.300 | 0.200 ± 0.141 |"
    assert lines[3] == "| pairs | 10 | 20 | 15 ± 7.071 |"
    gaps = seed_table([{"seed": 0, "p": float("nan"), "q": 1.0}, {"seed": 1, "p": 0.5}, {"seed": 2, "p": 0.7}])
    assert gaps.splitlines()[2:] == ["| p | n/a | 0.500 | 0.700 | 0.600 ± 0.141 (2 of 3 seeds) |",
                                     "| q | 1.000 | n/a | n/a | 1.000 ± 0.000 (1 of 3 seeds) |"]
    assert seed_table([{"seed": 0, "p": float("nan")}]).splitlines()[2] == "| p | n/a | n/a |"


def test_prefixed_tables_groups_rows_by_prefix_and_skips_empty_tables():
    from elleci.testbed.pipeline import prefixed_tables, seed_table
    results = [{"seed": 0, "acc/SFT": 0.1, "acc/DPO": 0.2, "len/SFT": 30.0, "seconds": 9.0},
               {"seed": 1, "acc/SFT": 0.3, "len/SFT": 31.0}]
    text = prefixed_tables(results, [("acc", "accuracy"), ("none", "absent"), ("len", "length")])
    want_acc = seed_table([{"seed": 0, "SFT": 0.1, "DPO": 0.2}, {"seed": 1, "SFT": 0.3}])
    assert text == f"accuracy\n{want_acc}\n\nlength\n" + seed_table([{"seed": 0, "SFT": 30.0}, {"seed": 1, "SFT": 31.0}])
    assert "| DPO | 0.200 | n/a | 0.200 ± 0.000 (1 of 2 seeds) |" in text and "absent" not in text


def test_resumable_seeds_saves_loads_and_reruns_on_other_settings(tmp_path):
    from argparse import Namespace
    from elleci.testbed.pipeline import resumable_seeds
    calls = []

    def run_seed(args, seed):
        calls.append(seed)
        return {"seed": seed, "acc": seed / 10 + args.lr}

    args = Namespace(seeds=[0, 1], out=str(tmp_path), lr=0.5)
    first = resumable_seeds(args, run_seed, print_fn=lambda *a: None)
    assert calls == [0, 1] and (tmp_path / "seed1" / "result.json").is_file()
    args.seeds = [0, 1, 2]                                    # two finished seeds are loaded, one is run
    assert resumable_seeds(args, run_seed, print_fn=lambda *a: None) == first + [{"seed": 2, "acc": 0.7}]
    assert calls == [0, 1, 2]
    args.lr = 0.25                                           # other settings: every seed runs again
    assert [r["acc"] for r in resumable_seeds(args, run_seed, print_fn=lambda *a: None)] == [0.25, 0.35, 0.45]
    assert calls == [0, 1, 2, 0, 1, 2]
