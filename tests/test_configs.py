"""Every `*Config` dataclass checks its fields when constructed and names the bad one with what it allows."""
import ast
import math
import re
from pathlib import Path

import pytest

from elleci._checks import check_choice, check_int, check_number
from elleci.algos.alignment.iterative_dpo import IterativeDPOConfig
from elleci.algos.curation.curriculum import CurriculumConfig, StageConfig
from elleci.algos.merging.fslora import FSLoRAConfig
from elleci.algos.merging.merge_config import MergeConfig
from elleci.algos.reasoning.grpo import GRPOConfig
from elleci.algos.reasoning.spag import SPAGConfig
from elleci.model.lora import LoraConfig
from elleci.testbed.grounded_base import GroundedBaseConfig
from elleci.testbed.pipeline import BaseConfig, PreferenceConfig, SFTConfig

PKG = Path(__file__).resolve().parents[1] / "elleci"


def config_classes_without_post_init(source: str) -> list[str]:
    """Names of the @dataclass classes called *Config in `source` that define no __post_init__."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            decorators = [ast.unparse(d) for d in node.decorator_list]
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if any(d.startswith(("dataclass", "dataclasses.dataclass")) for d in decorators) and \
                    "__post_init__" not in methods:
                bad.append(node.name)
    return bad


def test_every_config_dataclass_validates_in_post_init():
    planted = "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass XConfig:\n    n: int = 1\n"
    assert config_classes_without_post_init(planted) == ["XConfig"]        # the check can fail
    found, missing = 0, []
    for path in sorted(PKG.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        found += len(re.findall(r"^class \w+Config\b", source, flags=re.M))
        missing += [f"{path.relative_to(PKG)}: {name}" for name in config_classes_without_post_init(source)]
    assert found >= 13 and missing == []


GOOD_MERGE = dict(method="linear", models=["a", "b"], output="o")

BAD = [   # (constructor, keyword arguments, the exact error)
    (BaseConfig, dict(n_train=0), "BaseConfig.n_train must be an int >= 1, got 0"),
    (BaseConfig, dict(pretrain_steps=True), "BaseConfig.pretrain_steps must be an int >= 1, got True"),
    (BaseConfig, dict(seq_len=1), "BaseConfig.seq_len must be an int >= 2, got 1"),
    (BaseConfig, dict(pretrain_lr=0.0), "BaseConfig.pretrain_lr must be a number > 0, got 0.0"),
    (BaseConfig, dict(levels=(1, 4)),
     "BaseConfig.levels must be a non-empty tuple of levels from (1, 2, 3), got (1, 4)"),
    (BaseConfig, dict(lexicon=1), "BaseConfig.lexicon must be True or False, got 1"),
    (BaseConfig, dict(seed=1.5), "BaseConfig.seed must be an int, got 1.5"),
    (SFTConfig, dict(steps=0), "SFTConfig.steps must be an int >= 1, got 0"),
    (SFTConfig, dict(lora_r=2.0), "SFTConfig.lora_r must be an int >= 1, got 2.0"),
    (SFTConfig, dict(judge_examples=-1), "SFTConfig.judge_examples must be an int >= 0, got -1"),
    (SFTConfig, dict(target_modules=None), "SFTConfig.target_modules must be a string or a list of strings, got None"),
    (PreferenceConfig, dict(batch_size=False), "PreferenceConfig.batch_size must be an int >= 1, got False"),
    (PreferenceConfig, dict(una_kind="bce"), "PreferenceConfig.una_kind must be one of ('binary', 'score'), got 'bce'"),
    (PreferenceConfig, dict(nll_weight=-0.5), "PreferenceConfig.nll_weight must be a number >= 0, got -0.5"),
    (PreferenceConfig, dict(beta=math.nan), "PreferenceConfig.beta must be a number > 0, got nan"),
    (GroundedBaseConfig, dict(people=0), "GroundedBaseConfig.people must be an int in [1, 16], got 0"),
    (GroundedBaseConfig, dict(layout="MX"),
     "GroundedBaseConfig.layout must be a non-empty string of 'M' (Mamba) and 'A' (attention), got 'MX'"),
    (StageConfig, dict(steps=0, lr=1e-3), "StageConfig.steps must be an int >= 1, got 0"),
    (StageConfig, dict(steps=5, lr=-1.0), "StageConfig.lr must be a number > 0, got -1.0"),
    (CurriculumConfig, dict(cap=0), "CurriculumConfig.cap must be an int >= 1, math.inf or None, got 0"),
    (CurriculumConfig, dict(temperature=0), "CurriculumConfig.temperature must be a number > 0 or math.inf, got 0"),
    (CurriculumConfig, dict(stage1=(80, 3e-3)), "CurriculumConfig.stage1 must be a StageConfig(steps, lr, batch_size), "
                                               "got (80, 0.003)"),
    (MergeConfig, dict(GOOD_MERGE, output=""), "'output' must be a directory path (a non-empty string), got ''"),
    (MergeConfig, dict(GOOD_MERGE, method="fisher"), "unknown merge method 'fisher'"),
    (MergeConfig, dict(GOOD_MERGE, weights=[1.0, "x"]), "'weights' must be a list with one number per model (2)"),
    (LoraConfig, dict(r=True), "LoraConfig.r must be an int >= 1, got True"),
    (LoraConfig, dict(lora_dropout=1.0), "LoraConfig.lora_dropout must be a number in [0, 1), got 1.0"),
    (LoraConfig, dict(layers_to_transform=2),
     "LoraConfig.layers_to_transform must be a list of block indices (ints >= 0) or None, got 2"),
    (LoraConfig, dict(init_lora_weights=1),
     "LoraConfig.init_lora_weights must be one of (True, False, 'gaussian'), got 1"),
    (IterativeDPOConfig, dict(rounds=0), "IterativeDPOConfig.rounds must be an int >= 1, got 0"),
    (IterativeDPOConfig, dict(top_p=1.5), "IterativeDPOConfig.top_p must be a number in (0, 1] or None, got 1.5"),
    (IterativeDPOConfig, dict(label_smoothing=0.6),
     "IterativeDPOConfig.label_smoothing must be a number in [0, 0.5], got 0.6"),
    (SPAGConfig, dict(games=0), "SPAGConfig.games must be an int >= 1, got 0"),
    (SPAGConfig, dict(passes=0), "SPAGConfig.passes must be a number > 0, got 0"),
    (SPAGConfig, dict(reference_policy="base"), "SPAGConfig.reference_policy must be one of ('imitation', 'previous'), "
                                                "got 'base'"),
    (GRPOConfig, dict(steps=0), "GRPOConfig.steps must be an int >= 1, got 0"),
    (GRPOConfig, dict(group_size=1), "GRPOConfig.group_size must be an int >= 2, got 1"),
    (GRPOConfig, dict(mu=True), "GRPOConfig.mu must be an int >= 1, got True"),
    (GRPOConfig, dict(top_k=0), "GRPOConfig.top_k must be an int >= 1 or None, got 0"),
    (GRPOConfig, dict(reference="none"), "GRPOConfig.beta must be 0 with reference='none'"),
    (FSLoRAConfig, dict(rounds=0), "FSLoRAConfig.rounds must be an int >= 1, got 0"),
    (FSLoRAConfig, dict(ranks=[4, 0]),
     "FSLoRAConfig.ranks must be None, an int >= 1 or a non-empty list of ints >= 1 (one per client), got [4, 0]"),
    (FSLoRAConfig, dict(client_betas=(0.9, 1.0)), "FSLoRAConfig.client_betas must be a pair of numbers in [0, 1), "
                                                  "got (0.9, 1.0)"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD, ids=[f"{c.__name__}-{m[:40]}" for c, _, m in BAD])
def test_bad_field_is_named_with_its_allowed_range(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert str(info.value).startswith(message)


def test_defaults_and_limits_are_accepted():
    for cls in (BaseConfig, SFTConfig, PreferenceConfig, GroundedBaseConfig, CurriculumConfig, LoraConfig,
                IterativeDPOConfig, SPAGConfig, GRPOConfig, FSLoRAConfig):
        cls()
    StageConfig(1, 1e-9, 1)
    CurriculumConfig(cap=math.inf, temperature=math.inf, max_per_task=1)
    CurriculumConfig(cap=None)
    MergeConfig(**GOOD_MERGE)
    GRPOConfig(reference="none", beta=0, top_k=1, top_p=1.0, max_grad_norm=None)
    SPAGConfig(temperature=0.0, decay=1.0, kl_coeff=0)
    IterativeDPOConfig(label_smoothing=0.5, k=2)
    FSLoRAConfig(ranks=4)
    LoraConfig(layers_to_transform=[0, 1], init_lora_weights="gaussian", target_modules=["w1"])
    SFTConfig(target_modules=["attn.w_q"], lr=1)                  # an int where a float is meant is a number


def test_check_messages_show_the_range():
    with pytest.raises(ValueError, match=r"^C\.n must be an int in \[1, 3\], got 4$"):
        check_int("C", "n", 4, ge=1, le=3)
    with pytest.raises(ValueError, match=r"^C\.x must be a number in \(0, 1\), got 1$"):
        check_number("C", "x", 1, gt=0, lt=1)
    with pytest.raises(ValueError, match=r"^C\.x must be a number <= 2, got inf$"):
        check_number("C", "x", math.inf, le=2)
    with pytest.raises(ValueError, match=r"^C\.k must be one of \('a', 'b'\), got 'c'$"):
        check_choice("C", "k", "c", ("a", "b"))
    check_int("C", "n", None, ge=1, optional=True)
    check_number("C", "x", math.inf, gt=0, inf=True)
