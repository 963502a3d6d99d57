"""Typed TOML configs: types (bools are not numbers), ranges, choices, unknown keys, overrides, TOML round trip."""
from dataclasses import dataclass

import pytest

from elleci.config_schema import (ConfigError, fail, help_lines, load_config, optional_section, section, setting,
                                  to_toml)


@dataclass
class Train:
    steps: int = setting(10, "optimizer steps", ge=1)
    lr: float = setting(1e-4, "peak learning rate", gt=0)
    schedule: str = setting("cosine", "LR schedule", choices=("cosine", "wsd", "constant"))
    report_to: list[str] = setting([], "reporters", choices=("tensorboard", "wandb"))
    bf16: bool = setting(False, "bf16 weights")


@dataclass
class Lora:
    r: int = setting(16, "rank", ge=1)
    target_modules: list[str] = setting(["in_proj", "w_q"], "layers")


@dataclass
class Run:
    out_dir: str = setting("", "output directory", required=True)
    train: Train = section(Train)
    lora: Lora | None = optional_section(Lora)

    def check(self):
        if self.train.schedule == "wsd" and self.train.steps < 5:
            fail("train.steps", "wsd needs at least 5 steps")


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_reads_types_and_defaults(tmp_path):
    cfg = load_config(Run, _write(tmp_path, 'out_dir = "o"\n[train]\nlr = 1\nsteps = 3\n'))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.steps == 3
    assert cfg.lora is None and cfg.train.schedule == "cosine"


@pytest.mark.parametrize("text, match", [
    ('[train]\nbach_size = 3', r"c.toml: unknown key 'bach_size' in \[train\]"),
    ('[trian]\nlr = 3', r"unknown section 'trian' .*did you mean 'train'"),
    ('[train]\nsteps = true', r"c.toml: \[train\] steps must be an integer, got true \(a boolean\)"),
    ('[train]\nlr = "1e-4"', r"\[train\] lr must be a number, got \"1e-4\" \(a string\)"),
    ('[train]\nsteps = 2.5', r"\[train\] steps must be an integer, got 2.5 \(a number\)"),
    ('[train]\nlr = -1.0', r"\[train\] lr must be > 0, got -1.0"),
    ('[train]\nschedule = "linear"', r'\[train\] schedule must be one of "cosine", "wsd", "constant"; got "linear"'),
    ('[train]\nreport_to = ["tb"]', r'\[train\] report_to must be one of "tensorboard", "wandb"; got "tb"'),
    ('[train]\nsteps = 3\nschedule = "wsd"', r"c.toml: \[train\] steps: wsd needs at least 5 steps"),
    ('[train\nsteps = 3', r"c.toml: not valid TOML"),
])
def test_file_errors_name_file_and_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, _write(tmp_path, 'out_dir = "o"\n' + text + "\n"))


def test_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="out_dir is required"):
        load_config(Run, _write(tmp_path, "[train]\nsteps = 3\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "nope.toml")


def test_overrides_parse_to_the_field_type(tmp_path):
    p = _write(tmp_path, 'out_dir = "o"\n')
    cfg = load_config(Run, p, ["train.lr=3e-4", "train.steps=7", "train.bf16=true", "lora.r=8",
                               "lora.target_modules=w1,w2", "out_dir=runs/x", "train.report_to=[]"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.bf16, cfg.lora.r) == (3e-4, 7, True, 8)
    assert cfg.lora.target_modules == ["w1", "w2"] and cfg.out_dir == "runs/x"
    for bad, match in (("train.steps=1.5", r"command line 'train.steps=1.5': \[train\] steps must be"),
                       ("train.bf16=1", r"\[train\] bf16 must be a boolean, got 1"),
                       ("train.lr=abc", r"\[train\] lr cannot read 'abc' as a number"),
                       ("train.nope=1", r"unknown key 'nope' in \[train\]"),
                       ("trainlr", r"must look like section.key=value"),
                       ("train.schedule=linear", r"must be one of")):
        with pytest.raises(ConfigError, match=match):
            load_config(Run, p, [bad])


def test_toml_round_trip(tmp_path):
    cfg = load_config(Run, _write(tmp_path, 'out_dir = "ciao \\"è\\" \\\\ x"\n[lora]\nr = 4\n'), ["train.lr=1e-05"])
    text = to_toml(cfg)
    again = load_config(Run, _write(tmp_path, text))
    assert again == cfg and "[lora]" in text


def test_help_lists_every_setting_with_default():
    text = "\n".join(help_lines(Run))
    for needle in ("out_dir = \"\"", "[train]", "steps = 10", "lr = 0.0001", 'schedule = "cosine"', "[lora] (optional",
                   'target_modules = ["in_proj", "w_q"]', "bf16 = false", "required", "> 0"):
        assert needle in text, needle
