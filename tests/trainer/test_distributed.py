"""Data parallelism under torchrun (gloo, 2 CPU processes started by the test): the same final weights as one
process at the same global batch, for SFT (full fine-tuning) and DPO (LoRA); resume after SIGKILL of both
processes; a checkpoint written by 2 processes resumed by 1.

Everything runs in float64 with SGD and no clipping. Why the tolerance 1e-10: each micro-batch's forward and
backward is the same computation in both runs (same rows, same shapes); only the order of the gradient sum
differs — one process adds the 4 micro-batch terms left to right, two processes add (m0 + m1) + (m2 + m3).
Re-associating a sum of n terms changes it by at most γ_{n-1} Σ|m_i| with γ_k = kε/(1 - kε), ε = 2^-53,
i.e. ~3.3e-16 · Σ|m_i| per element; with lr 0.5, gradients of order 1 and 3 steps the weights differ by
~1e-15, far below 1e-10, while a wrong normalisation (e.g. averaging instead of summing over processes, or
normalising per process) changes them by ~lr · |g| / 2 ≈ 1e-2 (checked by the last assertion of the SFT
test: the 1-process run at half the batch differs by more than 1e-4). In float32 the same argument gives
~3 · 6e-8 · Σ|m_i| per element per step.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elleci.algos import dpo_loss
from elleci.algos.preference import collate_fn, encode_pairs, pairwise_step
from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora
from elleci.trainer import Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10


def _items(kind, tok):
    if kind == "sft":
        convs = [[{"role": "user", "content": "ciao " * (1 + i % 3) + str(i)},
                  {"role": "assistant", "content": "mondo " * (1 + (i * 5) % 7) + "risposta"}] for i in range(8)]
        return encode_sft(tok, convs)
    recs = [{"prompt": f"ciao {i}", "chosen": "mondo " * (1 + i % 4), "rejected": "hello world " * (3 - i % 3)}
            for i in range(8)]
    items = encode_pairs(tok, recs)
    for i, it in enumerate(items):
        it["ref_chosen_logps"], it["ref_rejected_logps"] = -10.0 - i, -12.0 + i
    return items


def run(kind, tok_dir, out_dir, *, steps=3, batch_size=4, kill_at_call=0):
    """One training run (in whatever process group is set up); returns the trainer's model."""
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300))
    if kind == "sft":
        step, collate = sft_step, sft_collate(tok.pad_id)
    else:
        apply_lora(model, LoraConfig(r=4, lora_alpha=8))
        step, collate = pairwise_step(dpo_loss, beta=0.5, reference="precomputed"), collate_fn("pairs", tok.pad_id)
    model.double()
    calls = [0]

    def step_fn(m, b):
        calls[0] += 1
        if calls[0] == kill_at_call:                         # as if the machine died: no handler runs
            os.kill(os.getpid(), signal.SIGKILL)
        return step(m, b)
    cfg = TrainerConfig(steps=steps, batch_size=batch_size, micro_batch_size=1, lr=0.5, optimizer="sgd",
                        schedule="constant", max_grad_norm=0.0, progress="none", handle_signals=False,
                        out_dir=str(out_dir) if out_dir else None, checkpoint_every=2, log_every=1, strategy="ddp")
    Trainer(model, step_fn, _items(kind, tok), cfg, collate=collate, tokenizer=tok).train()
    return model


def reference_values(tok_dir, n=7):
    """The sharded reference pass (float64, 7 pairs: the shards have 4 and 3) -> [(chosen, rejected)]."""
    from elleci.recipes.reference_pass import precompute_sharded
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300)).double()
    items = [{k: v for k, v in it.items() if not k.startswith("ref_")} for it in _items("dpo", tok)[:n]]
    precompute_sharded(model, items, pad_token_id=tok.pad_id, batch_size=2)
    return [(it["ref_chosen_logps"], it["ref_rejected_logps"]) for it in items]


def _torchrun(kind, tok_dir, out_dir, **kw):
    args = [f"{k}={v}" for k, v in kw.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, kind, str(tok_dir), str(out_dir), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def _weights(path):
    return torch.load(path, weights_only=True)


def _trainable(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_give_the_weights_of_one(kind, tok_dir, tmp_path):
    _check(_torchrun(kind, tok_dir, tmp_path / "two"))
    two = _weights(tmp_path / "two" / "weights.pt")
    one = _trainable(run(kind, tok_dir, None))
    assert _max_diff(one, two) < TOL
    half = _trainable(run(kind, tok_dir, None, batch_size=2))     # a different global batch: visibly different
    assert _max_diff(one, half) > 1e-4
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3                                       # rank 0 alone logs, once per step


def test_resume_after_sigkill_of_both_and_in_one_process(tok_dir, tmp_path):
    """Both processes die in step 4 (after checkpoint-2); re-running resumes. A 2-process checkpoint resumed
    by 2 processes and by 1 process ends at the uninterrupted run's weights."""
    ref = _trainable(run("sft", tok_dir, None, steps=5))
    killed = _torchrun("sft", tok_dir, tmp_path / "a", steps=5, kill_at_call=3 * 2 + 1)   # 2 micro-batches/rank
    assert killed.returncode != 0 and (tmp_path / "a" / "checkpoint-2").is_dir()
    assert not (tmp_path / "a" / "final").exists()
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _check(_torchrun("sft", tok_dir, tmp_path / "a", steps=5))
    assert _max_diff(ref, _weights(tmp_path / "a" / "weights.pt")) < TOL
    one = _trainable(run("sft", tok_dir, tmp_path / "b", steps=5))                          # resumed by 1 process
    assert _max_diff(ref, one) < TOL
    final = ElleciLM.from_pretrained(tmp_path / "a" / "final", dtype=torch.float64)        # single-file, loads in 1
    assert _max_diff(ref, {k: p.detach() for k, p in final.named_parameters()}) < TOL


def test_the_reference_pass_is_sharded_and_gathered(tok_dir, tmp_path):
    """2 processes each compute half of the reference log-probs; every item ends with the 1-process value
    (float64; only the batch composition, i.e. the padding after a causal sequence, differs: 1e-9)."""
    _check(_torchrun("ref", tok_dir, tmp_path))
    two = torch.load(tmp_path / "ref.pt", weights_only=True)
    one = torch.tensor(reference_values(tok_dir), dtype=torch.float64)
    assert two.shape == (7, 2) and float((one - two).abs().max()) < 1e-9
    assert float(one.abs().min()) > 1.0                           # real sums of log-probs, not defaults


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=6", "[train] batch_size: 6 must be a multiple of micro_batch_size 2 × world size 2 = 4"),
    ("distributed.strategy=zero3", "[distributed] strategy must be one of"),
])
def test_distributed_settings_are_checked_with_the_world_size(monkeypatch, override, message):
    from elleci.config_schema import ConfigError, load_config
    from elleci.recipes import sft
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        load_config(sft.Config, "configs/tiny/sft.toml", ["model.path=tiny", "train.micro_batch_size=2", override])
    assert message in str(e.value)


def test_the_elleci_command_under_torchrun(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m elleci sft CONFIG` = `elleci sft CONFIG` (fp32, SGD, 2 steps, no
    clipping, lr 0.1). Only the order of the gradient sum differs (see above): per element
    |Δg| <= 3 · 2^-24 · Σ|m_i| ~ 2e-7 · |g|, so after 2 steps |Δw| ~ 2 · 0.1 · 2e-7 · O(10): 1e-5 leaves a margin
    of ~100 while a wrong normalisation moves weights by ~0.1 · |g| ~ 1e-2."""
    from elleci.cli import main
    from elleci.model import from_pretrained
    monkeypatch.chdir(ROOT)
    tiny = ROOT / "configs" / "tiny"
    assert main(["convert", "tiny", str(tmp_path / "base"), "--tokenizer", str(tiny / "tokenizer.model")]) == 0
    args = ["sft", str(tiny / "sft.toml"), f"model.path={tmp_path / 'base'}", "train.steps=2", "train.warmup_steps=0",
            "train.optimizer=sgd", "train.lr=0.1", "train.max_grad_norm=0", "train.batch_size=8",
            "train.micro_batch_size=2", "data.eval=", "log.every=1", "log.progress=none"]
    assert main(args + [f"out_dir={tmp_path / 'one'}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "elleci", *args, f"out_dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    _check(proc)
    one = from_pretrained(tmp_path / "one" / "final").state_dict()
    two = from_pretrained(tmp_path / "two" / "final").state_dict()
    assert _max_diff(one, two) < 1e-5
    base = from_pretrained(tmp_path / "base").state_dict()
    assert _max_diff(one, base) > 1e-3                             # the run did move the weights


if __name__ == "__main__":                                         # a torchrun worker
    kind, tok_arg, out_arg, *rest = sys.argv[1:]
    opts = {k: int(v) for k, v in (a.split("=") for a in rest)}
    from elleci.trainer import distributed
    distributed.init_from_env("cpu")
    if kind == "ref":
        values = reference_values(tok_arg)
        if distributed.is_main():
            Path(out_arg).mkdir(parents=True, exist_ok=True)
            torch.save(torch.tensor(values, dtype=torch.float64), Path(out_arg) / "ref.pt")
    else:
        model = run(kind, tok_arg, Path(out_arg), **opts)
        if distributed.is_main():
            torch.save(_trainable(model), Path(out_arg) / "weights.pt")
    distributed.shutdown()
