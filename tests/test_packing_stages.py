"""[data] packing = true in the training stages: SFT rows packed once (batch_size counts rows), preference and
feedback micro-batches packed per step (batch_size counts pairs / records); the same documents give the same
loss and gradient as the padded batches."""
import copy
import json
from pathlib import Path

import pytest
import torch

from elleci.algos import dpo_loss, kto_loss
from elleci.algos.logprobs import IGNORE_INDEX
from elleci.algos.packing import pack_examples, packed_collate
from elleci.algos.preference import collate_fn, feedback_step, pairwise_step
from elleci.algos.sft import sft_collate, sft_step
from elleci.cli import main
from elleci.model import ElleciConfig, ElleciLM
from elleci.recipes.loading import load_tokenizer
from elleci.recipes.datasets import sft_items
from elleci.trainer import Trainer, TrainerConfig
from elleci.trainer.batching import default_units, scored_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
FAST = ["log.progress=none", "log.every=1", "train.warmup_steps=0"]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny", str(TINY / "tokenizer.model"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing") / "base"
    assert main(["convert", "tiny", str(d), "--tokenizer", str(TINY / "tokenizer.model")]) == 0
    return d


def model64(seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", layer_pattern="MMMA", mamba_input_gate=True,
                                           mla_latent_gate=True, chunk_size=4)).double()


def _close_grads(g1: dict, g2: dict) -> None:
    """1e-10 relative, except the two gradients that are fp32 sums over tokens by design (the log-prob kernel's
    lm_head accumulator and BitLinear's internal norms: tests/algos/test_packing.py): 1e-6."""
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        tol = 1e-6 if n.endswith("rms_norm.weight") or n == "lm_head.weight" else 1e-10
        torch.testing.assert_close(g2[n], g1[n], rtol=0, atol=tol * max(1.0, g1[n].abs().max().item()), msg=n)


def test_sft_packed_step_equals_the_padded_step_through_the_trainer(tok):
    """One SGD step of the Trainer over the same documents of configs/tiny's chat data (float64 model):
    padded, all examples in one micro-batch; packed, one ROW per micro-batch (the trainer weights each by its
    scored tokens). Loss: 1e-6 relative (fp32 token log-probs of the kernel); weight updates as gradients."""
    examples, _ = sft_items(TINY / "data" / "chat.jsonl", "auto", tok, 128, max_examples=6)
    rows = pack_examples(examples, 128)
    assert len(rows) < len(examples)                                 # several examples share a row
    packed_batch = packed_collate(tok.pad_id)(rows[:1])
    assert default_units(packed_batch) == scored_tokens(packed_batch) == \
        sum(int((torch.tensor(lab[1:]) != IGNORE_INDEX).sum()) for _, lab in rows[0])
    start, runs = model64(), []
    for items, collate, batch, micro in ((examples, sft_collate(tok.pad_id), len(examples), len(examples)),
                                         (rows, packed_collate(tok.pad_id), len(rows), 1)):
        m = copy.deepcopy(start)
        cfg = TrainerConfig(steps=1, batch_size=batch, micro_batch_size=micro, lr=0.5, optimizer="sgd",
                            schedule="constant", max_grad_norm=0.0, progress="none", handle_signals=False)
        history = Trainer(m, sft_step, items, cfg, collate=collate, print_fn=lambda *a: None).train()
        runs.append((history[0], {n: (start.get_parameter(n) - p).detach() / 0.5 for n, p in m.named_parameters()}))
    (h1, g1), (h2, g2) = runs
    torch.testing.assert_close(h2["loss"], h1["loss"], rtol=1e-6, atol=0)
    assert h1["sft/tokens"] == h2["sft/tokens"] > 0
    _close_grads(g1, g2)


def _pair_items(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ex(p, r):
        ids = torch.randint(4, 500, (p + r,), generator=g).tolist()
        return ids, [IGNORE_INDEX] * p + ids[p:]
    return [{"chosen": ex(p, r), "rejected": ex(p, r2), "ref_chosen_logps": -float(r) * 6.1,
             "ref_rejected_logps": -float(r2) * 6.3}
            for p, r, r2 in [(5, 9, 3), (3, 2, 7), (8, 4, 1), (2, 6, 6)][:n]]


@pytest.mark.parametrize("reference", ["precomputed", "frozen"])
def test_packed_pairwise_step_equals_the_padded_one(reference):
    """DPO over 4 pairs: chosen and rejected packed as 8 documents into rows of 24 vs two padded batches;
    each pair's chosen and rejected log-probs are read back by their document index (a swap would flip the
    loss's sign of the margin). Loss and gradients (float64 model, fp32 token log-probs: 1e-6 / as above)."""
    items, model = _pair_items(4), model64(1)
    padded, packed = collate_fn("pairs", 1)(items), collate_fn("pairs", 1, 24)(items)
    assert packed["packed"].input_ids.shape[0] < 8 and default_units(packed) == default_units(padded) == 4
    assert scored_tokens(packed) == scored_tokens(padded)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        step = pairwise_step(dpo_loss, reference=reference, beta=0.1)
        loss, metrics = step(model, batch)
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    (l1, m1, g1), (l2, m2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-5, atol=1e-6, msg=k)
    _close_grads(g1, g2)


def test_packed_kto_feedback_step_equals_the_padded_one():
    """KTO with its KL baseline (responses and mismatched pairs both packed), stored reference values."""
    pairs = _pair_items(4, seed=3)
    items = [{"response": it["chosen"], "target": float(i % 2), "ref_logps": it["ref_chosen_logps"],
              "kl_response": it["rejected"], "ref_kl_logps": it["ref_rejected_logps"]} for i, it in enumerate(pairs)]
    model = model64(2)
    padded, packed = collate_fn("feedback", 1)(items), collate_fn("feedback", 1, 24)(items)
    assert "packed" in packed and "kl_packed" in packed and default_units(packed) == 4
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, _ = feedback_step(kto_loss, kl_baseline=True, beta=0.1)(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    _close_grads(results[0][1], results[1][1])


def _records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_sft_cli_packing_runs_with_the_padded_loss(base, tmp_path, tok):
    """`elleci sft` on configs/tiny with packing = true: one SGD step over the same documents as a padded run
    (batch_size = all packed rows vs all examples) logs the same loss and writes the same weights (fp32:
    1e-5 relative)."""
    n_ex = len(sft_items(TINY / "data" / "chat.jsonl", "auto", tok, 128, max_examples=8)[0])
    n_rows = len(pack_examples(sft_items(TINY / "data" / "chat.jsonl", "auto", tok, 128, max_examples=8)[0], 128))
    common = [f"model.path={base}", "train.steps=1", "data.max_examples=8", "data.eval=", "train.optimizer=sgd",
              "train.max_grad_norm=0", "train.schedule=constant", *FAST]
    for name, extra in (("padded", [f"train.batch_size={n_ex}", f"train.micro_batch_size={n_ex}"]),
                        ("packed", ["data.packing=true", f"train.batch_size={n_rows}", "train.micro_batch_size=1"])):
        assert main(["sft", str(TINY / "sft.toml"), f"out_dir={tmp_path / name}", *common, *extra]) == 0
    a, b = _records(tmp_path / "padded")[0], _records(tmp_path / "packed")[0]
    assert a["sft/tokens"] == b["sft/tokens"] > 0
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    from safetensors.torch import load_file
    wa, wb = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("padded", "packed"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_packed_reward_model_step_equals_the_padded_one(tok):
    """Reward model: the a and b sequences packed as documents, each reward read at its document's last token
    (float64 backbone and head: the hidden states agree to 1e-10, so loss and gradients do too)."""
    from elleci.algos import RewardModel
    from elleci.algos.alignment.reward_model import preference_collate, reward_model_step
    pairs = _pair_items(4, seed=5)
    items = [{"a": it["chosen"][0], "b": it["rejected"][0], "p_a": p} for it, p in zip(pairs, (1.0, 0.3, 0.0, 0.8))]
    rm = RewardModel(model64(4), tok).double()
    torch.nn.init.normal_(rm.head.weight, std=0.1)
    padded, packed = preference_collate(items, 1), preference_collate(items, 1, packing_length=24)
    assert packed["packed"].input_ids.shape[0] < 8 and default_units(packed) == default_units(padded) == 8
    results = []
    for batch in (padded, packed):
        rm.zero_grad()
        loss, _ = reward_model_step(rm, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=0)
    _close_grads(results[0][1], results[1][1])


@pytest.mark.parametrize("stage,extra", [("dpo", []), ("una", ["loss.binary_loss=kto"]), ("reward-model", [])])
def test_dpo_una_reward_model_cli_packing_run(base, tmp_path, stage, extra):
    out = tmp_path / stage
    assert main([stage, str(TINY / f"{stage.replace('-', '_')}.toml"), f"model.path={base}", f"out_dir={out}",
                 "train.steps=1", "data.packing=true", "data.max_examples=8", *extra, *FAST]) == 0
    rec = _records(out)
    assert rec[0]["loss"] == rec[0]["loss"] and rec[0]["tok_per_s"] > 0 and (out / "final").is_dir()


@pytest.mark.parametrize("stage", ["grpo"])
def test_packing_refused_where_not_built_naming_the_key(tmp_path, stage, capsys):
    extra = ["reward.verifier=configs/tiny/verifier.py:reward"]
    assert main([stage, str(TINY / f"{stage}.toml"), "model.path=tiny", f"out_dir={tmp_path / 'o'}",
                 "model.tokenizer=configs/tiny/tokenizer.model", "data.packing=true", *extra]) == 2
    err = capsys.readouterr().err
    assert "[data] packing" in err and "not supported" in err and not (tmp_path / "o").exists()
