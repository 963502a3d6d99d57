"""Every loader in elleci refuses a planted pickle (finding 2 of issue 18): files are read with safetensors or
`torch.load(weights_only=True)` only, even where the environment asks torch to unpickle freely."""
import ast
import pathlib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from elleci.checkpointing import CheckpointError, write_manifest
from elleci.model import ElleciConfig, ElleciLM, load_original
from elleci.resume import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Planted:
    """Unpickling this writes a file: what a malicious checkpoint would do (here harmless and visible)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran")


def plant(path: Path, marker: Path, payload=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload if payload is not None else {"weight": torch.zeros(2), "x": Planted(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # torch's default would unpickle freely
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a loader unpickled the planted object"


def test_the_planted_pickle_does_run_code_when_unpickled(tmp_path):
    planted = plant(tmp_path / "x.pt", tmp_path / "ran")
    torch.load(planted, weights_only=False)                          # the danger being guarded against
    assert (tmp_path / "ran").read_text() == "code ran"


def test_load_original_and_convert_refuse_it(tmp_path, marker):
    from elleci.model.convert import main as convert
    planted = plant(tmp_path / "orig.pth", marker)
    with pytest.raises(ValueError, match="not loadable as a weights-only state dict"):
        load_original(planted)
    with pytest.raises(ValueError, match="weights-only"):
        convert([str(planted), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_load_checkpoint_refuses_it_even_with_a_matching_manifest(tmp_path, marker):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "c", model, step=1)
    plant(tmp_path / "c" / "trainer_state.pt", marker, {"step": 1, "extra": Planted(marker)})
    (tmp_path / "c" / "manifest.json").unlink()
    write_manifest(tmp_path / "c")                                   # an attacker can rewrite the manifest too
    with pytest.raises(CheckpointError, match="trainer_state.pt: not loadable with weights_only=True"):
        load_checkpoint(tmp_path / "c", model)


def test_iterative_dpo_resume_refuses_planted_snapshots(tmp_path, marker):
    import json
    from elleci.algos.alignment.iterative_dpo import IterativeDPOConfig, run_iterative_dpo
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", n_layers=2))
    cfg = IterativeDPOConfig(rounds=2)
    out = tmp_path / "run"
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    plant(out / "initial.pt", marker, {**params, "x": Planted(marker)})        # files of a run saved before
    plant(out / "round_1" / "trainable.pt", marker, {**params, "x": Planted(marker)})
    (out / "state.json").write_text(json.dumps({"completed_rounds": 1, "history": [{}], "config": asdict(cfg)}))
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        run_iterative_dpo(model, None, [[], []], None, cfg, out_dir=out, print_fn=lambda *a: None)
    (out / "initial.pt").unlink()
    torch.save(params, out / "initial.pt")                          # a clean snapshot: the round's file is next
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        run_iterative_dpo(model, None, [[], []], None, cfg, out_dir=out, print_fn=lambda *a: None)


def test_every_torch_load_in_the_code_passes_weights_only_true():
    calls = []
    for path in sorted((ROOT / "elleci").rglob("*.py")) + sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "the scan found no torch.load at all"
    assert [c for c, ok in calls if not ok] == []
