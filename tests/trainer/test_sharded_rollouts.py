"""Online stages under torchrun: each process samples and scores its chunks of the prompts, the global batch is
gathered (elleci/recipes/sharding.py). 2 gloo processes against 1 at the same global batch, tiny model, fp32,
SGD without clipping.

What must hold exactly: the rollouts of the first step (round) — prompts, completions, rewards, pairs — are
the ones one process makes (each row draws from the generator of its global (prompt, sample) index, and each
chunk is the same computation wherever it runs; the one-process reference runs with one thread, as the workers), so their logged statistics are equal to 1e-12 (a mean of the same numbers in
the same order). The weights then follow the trainer's bound for fp32 (tests/trainer/test_distributed.py):
only the order of the gradient sum differs, |Δw| ~ steps · lr · 3 · 2^-24 · Σ|m_i| ≪ 1e-5, while losing or
duplicating a chunk changes the batch and moves the adapter by ~lr · |g| ≈ 1e-3.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elleci.cli import main
from elleci.recipes.sharding import chunk_range, chunked

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"
COMMON = ["train.steps=2", "train.warmup_steps=0", "train.optimizer=sgd", "train.max_grad_norm=0", "data.eval=",
          "log.every=1", "log.progress=none", "rollout.max_new_tokens=8"]


@pytest.mark.parametrize("n_chunks", range(0, 10))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_chunk_goes_to_exactly_one_process_in_order(n_chunks, world):
    got = [c for r in range(world) for c in chunk_range(n_chunks, r, world)]
    assert got == list(range(n_chunks))                          # rank order = chunk order: the gather is ordered
    sizes = [len(chunk_range(n_chunks, r, world)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_chunks():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked([1, 2], 0) == [[1], [2]]                      # a chunk holds at least one prompt


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollouts")
    assert main(["convert", "tiny", str(d / "base"), "--tokenizer", str(TINY / "tokenizer.model")]) == 0
    (d / "verifier.py").write_text("def reward(record, response):\n    return float(len(response) % 4)\n")
    return d


def _both(args, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as the workers (OMP_NUM_THREADS=1): fp32 sampling and judging with the
    try:                                # same reduction splits, so near-ties resolve alike
        assert main(args + [f"out_dir={tmp_path / 'one'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "elleci", *args, f"out_dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (load_file(tmp_path / k / "final" / "adapter_model.safetensors") for k in ("one", "two"))
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-4     # B starts at 0: trained
    return [[json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("one", "two")]


def test_grpo_with_sharded_rollouts_matches_one_process(base, tmp_path, monkeypatch):
    """8 completions per step = 2 prompts × G 4, rollout.batch_size 4: 2 chunks of 1 prompt, one per process;
    the verifier (len % 4) gives every group a spread, so the advantages and the update are not zero."""
    args = ["grpo", str(TINY / "grpo.toml"), f"model.path={base / 'base'}", *COMMON, "train.batch_size=8",
            "train.micro_batch_size=2", "train.lr=0.05", "rollout.batch_size=4", "rollout.group_size=4",
            f"reward.verifier={base / 'verifier.py'}:reward"]
    one, two = _both(args, tmp_path, monkeypatch)
    assert len(one) == len(two) == 2
    for key in ("reward", "reward_std", "completion_length", "stopped"):
        assert abs(one[0][key] - two[0][key]) < 1e-12, key
    assert one[0]["reward_std"] > 0


def test_iterative_dpo_with_sharded_rollouts_and_judge_matches_one_process(base, tmp_path, monkeypatch):
    """One round of 4 prompts × k 2, rollout.batch_size 4: 2 chunks of 2 prompts, one per process; the policy
    judges its own responses (reward.source = "self") on the process that sampled them."""
    args = ["iterative-dpo", str(TINY / "iterative_dpo.toml"), f"model.path={base / 'base'}", *COMMON,
            "train.batch_size=4", "train.micro_batch_size=1", "train.lr=0.05", "rollout.k=2", "rollout.batch_size=4",
            "iterative.rounds=1", "iterative.prompts_per_round=4"]
    one, two = _both(args, tmp_path, monkeypatch)
    for key in ("round/reward_mean", "round/reward_spread", "round/train_pairs"):
        assert abs(one[0][key] - two[0][key]) < 1e-12, key
    pairs = [[json.loads(line) for line in (tmp_path / k / "rounds" / "round-1.jsonl").read_text().splitlines()]
             for k in ("one", "two")]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs[0]] == \
        [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs[1]]
    ref = [torch.tensor([[p["ref_chosen_logps"], p["ref_rejected_logps"]] for p in ps]) for ps in pairs]
    assert float((ref[0] - ref[1]).abs().max()) < 1e-4             # fp32 sums of ~30 log-probs, other batches
