"""FSDP2 full fine-tuning under torchrun (gloo, 2 CPU processes started by the test) against one process at the
same global batch: the same final weights, a sharded checkpoint (torch.distributed.checkpoint) that one process
resumes, resume after SIGKILL of both processes, and a single-file final/.

float64, SGD. Each micro-batch's forward/backward is the same computation in both runs; what differs is the
order of the gradient sum — one process accumulates 4 micro-batch terms left to right, two processes each add
2 and the reduce-scatter adds the two partial sums — and, with clipping, the norm's sum over shards. A
re-associated sum of n terms moves by at most γ_{n-1} Σ|m_i|, γ_k ≈ k · 2^-53, so ~1e-15 · |g| per element and
step: after 3 steps of lr 0.5 the weights agree to ~1e-14 ≪ 1e-10, while a wrong normalisation (FSDP's default
mean over processes instead of the sum, or a missing micro-batch) moves them by ~lr · |g| / 2 ≈ 1e-2: the
unclipped resume test sees that (with clipping active a global scale of the gradient is clipped away).
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from elleci.algos.sft import encode_sft, sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.trainer import Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10


def _items(tok):
    convs = [[{"role": "user", "content": "ciao " * (1 + i % 3) + str(i)},
              {"role": "assistant", "content": "mondo " * (1 + (i * 5) % 7) + "risposta"}] for i in range(8)]
    return encode_sft(tok, convs)


def run(tok_dir, out_dir, *, steps=3, clip=0.0, kill_at_call=0, strategy="fsdp", evals=0, bf16=0):
    """One float64 SFT run of the tiny model (whatever process group is set up); returns the trainer."""
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=300))
    model = model.to(torch.bfloat16) if bf16 else model.double()
    calls = [0]

    def step_fn(m, b):
        calls[0] += 1
        if calls[0] == kill_at_call:                         # as if the machine died: no handler runs
            os.kill(os.getpid(), signal.SIGKILL)
        return sft_step(m, b)
    items = _items(tok)
    cfg = TrainerConfig(steps=steps, batch_size=4, micro_batch_size=1, lr=0.5, optimizer="sgd", schedule="constant",
                        max_grad_norm=clip, progress="none", handle_signals=False, strategy=strategy,
                        out_dir=str(out_dir) if out_dir else None, checkpoint_every=2, log_every=1,
                        mixed_precision="bfloat16" if bf16 else None)
    trainer = Trainer(model, step_fn, items, cfg, collate=sft_collate(tok.pad_id), tokenizer=tok,
                      eval_data=items[:evals] if evals else None)
    trainer.train()
    return trainer


def _full(model):
    """{name: full tensor} of a plain or FSDP-sharded model (a collective under FSDP)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _torchrun(tok_dir, out_dir, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(tok_dir), str(out_dir), *[f"{k}={v}" for k, v in kw.items()]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp_two_processes_give_the_weights_of_one_with_clipping_and_accumulation(tok_dir, tmp_path):
    """2 micro-batches per process per step (accumulated without reduce-scatter, then one), clipping active
    (clip 0.5 < the grad norm ~ 10), 5 eval items (3 and 2 micro-batches per process: the spare forward)."""
    _check(_torchrun(tok_dir, tmp_path / "two", clip=0.5, evals=5))
    two = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    one_trainer = run(tok_dir, None, clip=0.5, evals=5)
    one = _full(one_trainer.model)
    assert _max_diff(one, two) < TOL
    assert min(r["grad_norm"] for r in one_trainer.history if "grad_norm" in r) > 1.0      # clipping did act
    import json
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = {}
    for r in one_trainer.history:
        ref.setdefault(r["step"], {}).update(r)
    assert len(logged) == 3 + 1 and "eval_loss" in logged[-1]     # rank 0 alone logs: 3 steps + the eval
    for rec in logged:                                             # reduced metrics = the 1-process ones
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in rec:
                assert abs(rec[key] - ref[rec["step"]][key]) < 1e-9 * max(1.0, abs(rec[key])), key


def test_fsdp_checkpoint_resume_after_sigkill_and_in_one_process(tok_dir, tmp_path):
    """Both processes die in step 4 (after the sharded checkpoint-2); re-running with 2 processes resumes; a
    copy of the same directory resumed by ONE process (no process group, a plain model) ends at the
    uninterrupted run's weights too; final/ is a single-file checkpoint loaded by `from_pretrained`."""
    ref = _full(run(tok_dir, None, steps=5).model)
    killed = _torchrun(tok_dir, tmp_path / "a", steps=5, kill_at_call=3 * 2 + 1)       # 2 micro-batches/rank
    assert killed.returncode != 0
    ck = tmp_path / "a" / "checkpoint-2"
    assert (ck / "shards" / ".metadata").is_file() and len(list((ck / "shards").glob("*.distcp"))) == 2
    assert not (tmp_path / "a" / "final").exists()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _check(_torchrun(tok_dir, tmp_path / "a", steps=5))
    assert _max_diff(ref, torch.load(tmp_path / "a" / "weights.pt", weights_only=True)) < TOL
    one = _full(run(tok_dir, tmp_path / "b", steps=5).model)                              # resumed by 1 process
    assert _max_diff(ref, one) < TOL
    assert sorted(p.name for p in (tmp_path / "a" / "final").iterdir()) == \
        ["config.json", "manifest.json", "model.safetensors", "tokenizer.model"]
    final = ElleciLM.from_pretrained(tmp_path / "a" / "final", dtype=torch.float64)
    assert _max_diff(ref, {k: v.detach() for k, v in final.state_dict().items()}) < TOL


def test_fsdp_bf16_mixed_precision_runs_and_starts_where_one_process_does(tok_dir, tmp_path):
    """model.dtype bfloat16 under FSDP: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). The first
    step's loss is the same forward as one process (same bf16 weights, same rows): equal to 1e-6; later steps
    differ by bf16 rounding of the gradient (reduced in fp32, then stored in bf16), so only 2e-2 is asked."""
    _check(_torchrun(tok_dir, tmp_path / "two", bf16=1, steps=2))
    import json
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # as the workers (OMP_NUM_THREADS=1): the same bf16 GEMM splits
    try:
        one = run(tok_dir, None, bf16=1, steps=2).history
    finally:
        torch.set_num_threads(threads)
    assert abs(two[0]["loss"] - one[0]["loss"]) < 1e-6 * abs(one[0]["loss"])
    assert abs(two[1]["loss"] - one[1]["loss"]) < 2e-2 and two[1]["loss"] < two[0]["loss"]
    final = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for k, v in final.items() if k.endswith("weight"))


if __name__ == "__main__":                                         # a torchrun worker
    tok_arg, out_arg, *rest = sys.argv[1:]
    opts = {k: (float(v) if k == "clip" else int(v)) for k, v in (a.split("=") for a in rest)}
    from elleci.trainer import distributed
    distributed.init_from_env("cpu")
    trainer = run(tok_arg, Path(out_arg), **opts)
    weights = _full(trainer.model)
    if distributed.is_main():
        torch.save(weights, Path(out_arg) / "weights.pt")
    distributed.shutdown()
