"""Every other subcommand of `elleci` end to end on configs/tiny, with a couple of steps each."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elleci.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
FAST = ["log.progress=none", "log.every=1", "train.warmup_steps=0"]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny base (convert) and a 3-step full SFT of it: the starting model of the other stages."""
    d = tmp_path_factory.mktemp("pipeline")
    assert main(["convert", "tiny", str(d / "base"), "--tokenizer", str(TINY / "tokenizer.model")]) == 0
    assert main(["sft", str(TINY / "sft.toml"), f"model.path={d / 'base'}", f"out_dir={d / 'sft'}",
                 "train.steps=3", *FAST]) == 0
    return d / "sft" / "final"


@pytest.fixture
def length_verifier(tmp_path):
    """A verifier that always separates responses: their length in characters."""
    p = tmp_path / "lengths.py"
    p.write_text("def reward(record, response):\n    return float(len(response))\n")
    return f"{p}:reward"


def _records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_una_binary_and_scored(sft, tmp_path):
    assert main(["una", str(TINY / "una.toml"), f"model.path={sft}", f"out_dir={tmp_path / 'b'}", "train.steps=2",
                 *FAST]) == 0
    assert "rewards/desired" in _records(tmp_path / "b")[0] or "rewards/undesired" in _records(tmp_path / "b")[0]
    assert main(["una", str(TINY / "una.toml"), f"model.path={sft}", f"out_dir={tmp_path / 's'}", "train.steps=2",
                 "loss.feedback=scored", "loss.min_score=1", "loss.max_score=10",
                 "data.train=configs/tiny/data/feedback_scored.jsonl", *FAST]) == 0
    assert "scores/explicit" in _records(tmp_path / "s")[0]
    assert (tmp_path / "s" / "final" / "adapter_model.safetensors").is_file()


def test_reward_model_then_iterative_dpo_with_it(sft, tmp_path):
    rm = tmp_path / "rm"
    assert main(["reward-model", str(TINY / "reward_model.toml"), f"model.path={sft}", f"out_dir={rm}",
                 "train.steps=2", *FAST]) == 0
    assert (rm / "final" / "reward_head.safetensors").is_file() and "eval_rewards/accuracies" in _records(rm)[-1]
    from elleci.recipes.reward_model import load_reward_model
    model = load_reward_model(str(rm / "final"))
    assert model.head.weight.abs().sum() > 0                                    # trained away from zero
    out = tmp_path / "idpo"
    assert main(["iterative-dpo", str(TINY / "iterative_dpo.toml"), f"model.path={sft}", f"out_dir={out}",
                 "train.steps=2", "iterative.rounds=2", "iterative.prompts_per_round=3", "rollout.k=2",
                 "rollout.max_new_tokens=6", "reward.source=reward_model", f"reward.reward_model={rm / 'final'}",
                 "data.max_examples=4", *FAST]) == 0
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["round-1.jsonl", "round-2.jsonl"]


@pytest.mark.parametrize("source", ["self", "verifier", "judge"])
def test_iterative_dpo_reward_sources(sft, tmp_path, length_verifier, source):
    out = tmp_path / source
    extra = {"self": [], "verifier": [f"reward.verifier={length_verifier}"],
             "judge": [f"reward.judge={sft}"]}[source]
    assert main(["iterative-dpo", str(TINY / "iterative_dpo.toml"), f"model.path={sft}", f"out_dir={out}",
                 "train.steps=2", "iterative.rounds=1", "iterative.prompts_per_round=3", "rollout.k=3",
                 "rollout.max_new_tokens=6", f"reward.source={source}", "data.max_examples=3",
                 "eval.max_new_tokens=4", *extra, *FAST]) == 0
    first = _records(out)[0]
    assert first["round"] == 1 and first["round/train_pairs"] >= 1
    pairs = [json.loads(x) for x in (out / "rounds" / "round-1.jsonl").read_text().splitlines()]
    assert all("ref_chosen_logps" in p and p["reward_chosen"] > p["reward_rejected"] for p in pairs)
    if source == "verifier":
        assert all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)       # the verifier ranked them


def test_rlaif_v(sft, tmp_path):
    out = tmp_path / "rv"
    code = main(["rlaif-v", str(TINY / "rlaif_v.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=2",
                 "iterative.rounds=1", "iterative.prompts_per_round=6", "rollout.k=4", "rollout.max_new_tokens=12",
                 *FAST])
    assert code == 0 and (out / "final" / "adapter_model.safetensors").is_file()
    assert {"round/candidates", "round/accept_rate"} <= set(_records(out)[0])


def test_grpo_micro_batches_rollouts_and_backward(sft, tmp_path, length_verifier):
    out = tmp_path / "grpo"
    assert main(["grpo", str(TINY / "grpo.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=2",
                 "train.batch_size=8", "train.micro_batch_size=2", "rollout.group_size=4", "rollout.batch_size=4",
                 "rollout.max_new_tokens=6", f"reward.verifier={length_verifier}", "data.max_examples=4",
                 "eval.budget=4", "eval.max_new_tokens=4", *FAST]) == 0
    rec = _records(out)
    assert rec[0]["reward_std"] > 0 and "grpo/kl" in rec[0] and "eval_verifier_accuracy_budget4" in rec[-1]


def test_merge_generate_and_python_m(sft, tmp_path, monkeypatch, capsys):
    dpo = tmp_path / "dpo"
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={sft}", f"out_dir={dpo}", "train.steps=2", *FAST]) == 0
    cfg = tmp_path / "merge.toml"
    cfg.write_text(f'method = "linear"\nmodels = ["{sft}", "{dpo / "final"}"]\noutput = "{tmp_path / "merged"}"\n'
                   f'weights = [0.5, 0.5]\n')
    assert main(["merge", str(cfg)]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    a = load_file(sft / "model.safetensors")
    key = next(k for k in a if k.endswith("attn.in_proj.weight"))
    assert not torch.equal(merged[key], a[key])                    # the DPO adapter moved the merged weights
    assert not any(p.name.startswith(".merge-inputs") for p in tmp_path.iterdir())
    recorded = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert recorded["models"] == [str(sft), str(dpo / "final")]                  # as given, not the staged copies
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    got = subprocess.run([sys.executable, "-m", "elleci", "generate", str(tmp_path / "merged"), "--prompt", "Ciao",
                          "--max-new-tokens", "5", "--temperature", "0"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert got.returncode == 0 and got.stdout.strip() != ""
    monkeypatch.setattr("sys.stdin", io.StringIO("ciao\n/reset\nhello\n\n"))
    capsys.readouterr()
    assert main(["generate", str(dpo / "final"), "--max-new-tokens", "4"]) == 0   # chat: 2 answers, then quits
    assert capsys.readouterr().out.count("> ") == 4                               # prompts: ciao, /reset, hello, ""


def test_generate_chat_stops_at_im_end(sft):
    """Chat mode passes <|im_end|> (id 3) as the first stop id; the tokenizer's eos_id is <|endoftext|> (0)."""
    from types import SimpleNamespace

    from elleci.recipes import generate
    from elleci.recipes.loading import load_model, load_tokenizer
    tok, model = load_tokenizer(str(sft)), load_model(str(sft))
    seen = {}
    real = model.generate

    def spy(ids, **kw):
        seen.update(kw)
        return real(ids, **kw)
    model.generate = spy
    args = SimpleNamespace(raw=False, top_p=1.0, top_k=0, max_new_tokens=3, temperature=0.0)
    generate.reply(model, tok, tok.apply_chat_template([{"role": "user", "content": "ciao"}],
                                                       add_generation_prompt=True), args, None)
    assert seen["eos_token_id"] == [tok.im_end_id, tok.eos_id] and tok.im_end_id == 3 and tok.eos_id == 0
    assert generate.stop_ids(tok, raw=True) == [0]


def test_merge_errors_name_the_file(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('method = "tiess"\nmodels = ["a"]\noutput = "o"\n')
    assert main(["merge", str(cfg)]) == 2
    assert f"{cfg}: unknown merge method 'tiess'" in capsys.readouterr().err


def test_eval_is_delegated_or_explained(capsys):
    code = main(["eval", "--help"])
    err = capsys.readouterr().err
    assert code == 0 or "elleci.eval.command is not available" in err


def test_convert_refuses_a_tokenizer_larger_than_the_model(tmp_path, capsys):
    from elleci.model import Tokenizer
    big = tmp_path / "tok"
    (tmp_path / "t.txt").write_text("\n".join(f"word{i} other{i * 7}" for i in range(3000)))
    Tokenizer.train(tmp_path / "t.txt", vocab_size=1000, out_dir=big)
    assert main(["convert", "tiny", str(tmp_path / "m"), "--tokenizer", str(big)]) == 2
    assert "1000 ids" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_periodic_eval_runs_elleci_eval_task_files(sft, tmp_path):
    """[eval] tasks = TOML files of [[tasks]] tables, run by elleci.eval.run_tasks at each evaluation."""
    pytest.importorskip("elleci.eval")
    (tmp_path / "t.txt").write_text("Roma è la capitale della Italia.\n\nParis is the capital of France.\n")
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[[tasks]]\ntype = "perplexity"\nname = "testo"\npath = "{tmp_path / "t.txt"}"\n')
    out = tmp_path / "o"
    assert main(["sft", str(TINY / "sft.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=2",
                 "eval.every=1", f"eval.tasks={tasks}", *FAST]) == 0
    evals = [r for r in _records(out) if "eval/testo/token_perplexity" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval/testo/token_perplexity"] > 1 for r in evals)


def test_eval_task_file_errors_are_found_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[eval]\nx = 1\n")
    assert main(["sft", str(TINY / "sft.toml"), "model.path=tiny", "model.tokenizer=configs/tiny/tokenizer.model",
                 f"out_dir={tmp_path / 'o'}", f"eval.tasks={bad}"]) == 2
    assert f"[eval] tasks: {bad}: expected [[tasks]] tables" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("loss, reference", [("cdpo", "adapters"), ("hinge", "frozen"), ("robust", "precomputed")])
def test_dpo_losses_and_references(sft, tmp_path, loss, reference):
    smoothing = ["loss.label_smoothing=0.1"] if loss in ("cdpo", "robust") else []
    out = tmp_path / loss
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=1",
                 f"loss.type={loss}", f"reference.kind={reference}", "data.eval=", *smoothing, *FAST]) == 0
    first = _records(out)[0]
    # at the start the policy is the reference: every loss sits at its value for h = 0
    expected = {"cdpo": 0.6931, "hinge": 1.0, "robust": 0.6931}[loss]
    assert first["loss"] == pytest.approx(expected, abs=1e-3) and first["rewards/margin"] == pytest.approx(0, abs=1e-4)


def test_bf16_weights_and_gradient_checkpointing(sft, tmp_path):
    out = tmp_path / "bf16"
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=2",
                 "model.dtype=bfloat16", "model.gradient_checkpointing=true", "data.eval=", *FAST]) == 0
    rec = _records(out)
    assert all(r["loss"] == r["loss"] for r in rec) and rec[-1]["grad_norm"] > 0
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())          # LoRA weights stay fp32


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_dpo_reference_free_losses_run_without_a_reference_pass(sft, tmp_path, capsys, loss):
    out = tmp_path / loss
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=2",
                 f"loss.type={loss}", "data.eval=", *FAST]) == 0
    said = capsys.readouterr().out
    assert "computing the reference log-probs" not in said              # no reference pass at all
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _records(out))
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_dpo_refuses_an_nll_term_on_mean_log_probs(sft, tmp_path, capsys):
    assert main(["dpo", str(TINY / "dpo.toml"), f"model.path={sft}", f"out_dir={tmp_path / 'o'}",
                 "loss.type=simpo", "loss.nll_weight=1.0"]) == 2
    assert "[loss] nll_weight" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_una_kto_starts_at_one_half(sft, tmp_path):
    """KTO through `elleci una`: at the first step the policy is the reference (LoRA B = 0), so every reward
    r = 0 and the KL baseline z0 = 0, and each example's loss is 1 − σ(0) = 0.5 (unit class weights)."""
    out = tmp_path / "kto"
    assert main(["una", str(TINY / "una.toml"), f"model.path={sft}", f"out_dir={out}", "train.steps=2",
                 "loss.binary_loss=kto", "loss.beta=0.1", "data.eval=", *FAST]) == 0
    first = _records(out)[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-4)
