import json
import math

import pytest
import torch

from elleci.model import ElleciLM, Tokenizer
from elleci.resume import ResumeMismatch


def test_pretrain_example_runs_saves_and_resumes(load_example, tmp_path, capsys):
    pretrain = load_example("pretrain")
    small = ["--n-docs", "300", "--vocab-size", "400", "--seq-len", "32", "--batch-size", "4", "--d-model", "32",
             "--n-layers", "2", "--log-every", "1", "--save-every", "2", "--out", str(tmp_path)]
    pretrain.main(small + ["--steps", "4"])
    printed = capsys.readouterr().out
    assert "step 0 | loss" in printed and "tok/s" in printed and "->" in printed
    model, tok = ElleciLM.from_pretrained(tmp_path / "final"), Tokenizer.load(tmp_path / "final")
    assert model.config.vocab_size >= tok.vocab_size and model.config.d_model == 32
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    with pytest.raises(ResumeMismatch, match=r"steps: 4 \(checkpoint\) -> 6 \(now\)"):   # a longer run is refused ...
        pretrain.main(small + ["--steps", "6", "--resume"])
    with (tmp_path / "metrics.jsonl").open("a") as f:                    # a killed run logged past its checkpoint
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    pretrain.main(small + ["--steps", "6", "--resume", "--allow-changes", "steps"])   # ... unless allowed by name
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
    resumed = ElleciLM.from_pretrained(tmp_path / "final")
    assert not torch.equal(resumed.lm_head.weight, model.lm_head.weight)   # training went on


def test_bench_lora_smoke_runs_on_cpu(load_example, capsys):
    assert load_example("bench_lora").main(["--smoke"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4")]
    assert len(rows) == 2 and all(line.count("×") == 3 for line in rows)


def test_pipeline_quick_runs_every_stage(load_example, tmp_path, capsys):
    results = load_example("pipeline").main(["--quick", "--out", str(tmp_path)])
    assert set(results[0]) == {"seed", "SFT", "DPO", "UNA-binary", "SFT continued (control)", "seconds"}
    assert all(0.0 <= results[0][k] <= 1.0 for k in ("SFT", "DPO", "UNA-binary"))
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["seed"] == 0
    assert "| DPO |" in capsys.readouterr().out


def test_sft_then_dpo_and_una_from_the_saved_stage(load_example, tmp_path, capsys):
    sft = load_example("sft").main(["--quick", "--out", str(tmp_path / "sft")])
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    dpo = load_example("dpo").main(["--quick", "--sft", str(tmp_path / "sft"), "--out", str(tmp_path / "dpo"),
                             "--reference", "frozen", "--loss", "ipo"])
    una = load_example("una").main(["--quick", "--sft", str(tmp_path / "sft"), "--out", str(tmp_path / "una"),
                             "--kind", "score"])
    assert dpo["before"] == una["before"] == sft["after"]          # both start from the saved SFT model
    out = capsys.readouterr().out
    assert "rewards/margin" in out and "SFT" in out and "UNA-score" in out


def test_dpo_example_feeds_each_loss_the_log_probs_it_is_defined_on(load_example, tmp_path, capsys):
    """IPO, SimPO and ORPO get per-token MEAN log-probs (policy and reference alike); SimPO/ORPO no reference."""
    sft = tmp_path / "sft"
    load_example("sft").main(["--quick", "--out", str(sft)])
    for loss, reduction, reference in (("ipo", "mean", "precomputed"), ("dpo", "sum", "precomputed"),
                                       ("simpo", "mean", "none"), ("orpo", "mean", "none")):
        mod, calls = load_example("dpo"), {}
        real_pre, real_step = mod.precompute_reference, mod.pairwise_step
        mod.precompute_reference = lambda *a, **k: calls.setdefault("pre", k["token_reduction"]) and real_pre(*a, **k)
        mod.pairwise_step = lambda fn, **k: calls.setdefault("step", k) and real_step(fn, **k)
        mod.main(["--quick", "--sft", str(sft), "--out", str(tmp_path / loss), "--loss", loss])
        assert calls["step"]["token_reduction"] == reduction and calls["step"]["reference"] == reference
        if reference == "precomputed":
            assert calls["pre"] == reduction                       # the reference's log-probs reduced alike
        else:
            assert "pre" not in calls                              # no reference pass at all
    una = load_example("una").main(["--quick", "--sft", str(sft), "--out", str(tmp_path / "kto"), "--kind", "kto"])
    assert 0.0 <= una["after"] <= 1.0 and "-> KTO" in capsys.readouterr().out


def test_bench_logprobs_dpo_step_smoke(load_example, capsys):
    load_example("bench_logprobs").main(["--dpo-step", "--tiny"])
    assert "one DPO step of tiny + LoRA r=16" in capsys.readouterr().out


def test_iterative_dpo_quick_runs_both_arms_and_resumes(load_example, tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "bases")]
    first = load_example("iterative_dpo").main(args)[0]
    assert {"SFT", "offline DPO", "iterative round 1", "iterative round 2"} <= set(first)
    assert (tmp_path / "seed0" / "iterative" / "round_2" / "metrics.json").is_file()
    assert any((tmp_path / "bases").iterdir())                       # the base was cached ...
    again = load_example("iterative_dpo").main(args)[0]                     # ... and reused; finished arms resume
    out = capsys.readouterr().out
    assert "base: loaded from" in out and "resuming after round 2" in out
    assert again == first


def test_bench_generate_reports_prefill_decode_and_bound(load_example, capsys):
    rows = load_example("bench_generate").main(["--presets", "tiny", "--batch", "1", "2", "--prompt-len", "4", "--new", "4"])
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 for r in rows)
    assert rows[1]["bound_tok_s"] == 2 * rows[0]["bound_tok_s"]        # the bound scales with the batch
    assert "% of bound" in capsys.readouterr().out


def test_rlaif_quick_self_labels_and_reports(load_example, tmp_path, capsys):
    res = load_example("rlaif").main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "bases")])[0]
    assert {"SFT", "judge accuracy", "judge position consistency", "RLAIF round 1", "RLAIF round 2"} <= set(res)
    assert all(0.0 <= res[k] <= 1.0 for k in ("SFT", "judge accuracy", "RLAIF round 2"))
    assert "judge accuracy" in capsys.readouterr().out


def test_merge_quick_prints_every_method_for_both_tasks(load_example, tmp_path, capsys):
    rows = load_example("merge").main(["--quick", "--cache", "", "--out", str(tmp_path)])[0]
    printed = capsys.readouterr().out
    for name in ("average", "task arithmetic", "TIES", "DARE-TIES", "SLERP", "RegMean α=1.0", "RegMean α=0.1"):
        assert any(k.startswith(name) for k in rows) and f"| {name}" in printed
    assert set(rows["base"]) == {"arithmetic", "words", "kept", "arithmetic NLL", "words NLL"}
    assert list(rows)[:3] == ["base", "arithmetic specialist", "translation specialist"]
    assert json.loads((tmp_path / "results.json").read_text())["results"]["0"].keys() == rows.keys()
    again = load_example("merge").main(["--quick", "--cache", "", "--out", str(tmp_path)])[0]     # reused, same order
    assert "results loaded from" in capsys.readouterr().out and list(again) == list(rows)


def test_bench_model_quick_cpu_table_has_every_row_with_positive_finite_numbers(load_example, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = load_example("bench_model").main(["--preset", "tiny", "--device", "cpu", "--seq", "64", "--batches", "2",
                                               "--steps", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| batch")]
    labels = [line.split("|")[1].strip() for line in rows]
    assert labels == ["2 × 64", "2 × 64", "2 × 64", "1", "16", "64"]       # train off/on, prefill, decode 1/16/64
    assert [line.split("|")[2].strip() for line in rows[:2]] == ["off", "on"]
    for line in rows:      # every cell a number; timing cells are not asserted (under load "0.3%" prints "0.0%")
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        numbers = [float(c.replace(",", "").rstrip("%")) for c in cells if c not in ("on", "off") and "×" not in c]
        assert numbers and all(math.isfinite(v) and v >= 0 for v in numbers), line
    for section in ("train", "prefill", "decode"):      # the raw values: rates n / t and bounds are positive
        for r in result[section]:
            assert all(v > 0 and math.isfinite(v) for k, v in r.items() if k.endswith(("tok_s", "_ms"))), r
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["checkpointing"] for r in result["train"]] == [False, True]
    assert [r["batch"] for r in result["decode"]] == [1, 16, 64]
    assert result["decode"][1]["bound_tok_s"] == min(16 * result["decode"][0]["bound_tok_s"],
                                                     result["prefill"][0]["bound_tok_s"])


def test_bench_model_bounds_hand_computed(load_example):
    bench = load_example("bench_model")
    # 1 PFLOP/s and 1e9 parameters: training 1e15 / 6e9, forward 1e15 / 2e9 tokens/s
    assert math.isclose(bench.training_bound(1e15, 10**9), 166_666.666_666_7)
    assert math.isclose(bench.forward_bound(1e15, 10**9), 500_000.0)
    # 3 TB/s over 2 GB of bf16 weights: 1,500 weight reads a second, one token per row each
    assert math.isclose(bench.decode_bound(3e12, 2 * 10**9, 1, 1e15, 10**9), 1_500.0)
    assert math.isclose(bench.decode_bound(3e12, 2 * 10**9, 64, 1e15, 10**9), 96_000.0)
    assert math.isclose(bench.decode_bound(3e12, 2 * 10**9, 1024, 1e15, 10**9), 500_000.0)   # compute-capped


def test_bench_model_prints_oom_per_configuration(load_example, monkeypatch, capsys):
    bench = load_example("bench_model")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(bench, "sequence_logprobs", out_of_memory)
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--seq", "16", "--batches", "1", "2", "--steps", "1",
                         "--warmup", "0", "--no-decode"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " × 16 |" in line]
    assert len(rows) == 4 and all(line.count("OOM") == 4 for line in rows)
    assert all(r["tok_s"] is None and r["bound_tok_s"] > 0 for r in result["train"]) and "decode" not in result


def test_bench_frozen_elleci_step_and_decode_smoke(load_example, tmp_path):
    """The elleci side of examples/bench_frozen.py (transformers is benchmark-only, not needed here)."""
    bench = load_example("bench_frozen")
    bench.main(["--preset", "tiny", "--make-frozen", str(tmp_path / "frozen")])
    res = bench.one_step_run("elleci", 48, "tiny", False, str(tmp_path / "frozen"))
    assert res["step2_s"] > 0 and res["peak_rss_gb"] > 0 and res["trainable"] > 0
    dec = bench.one_decode_run("frozen", "tiny")
    assert dec["tok_s"] > 0 and len(dec["tokens"]) == 17
    assert 0 < dec["resident_gb"] < bench.one_decode_run("latent", "tiny")["resident_gb"]
    blocks = bench.one_blocks_run("tiny", str(tmp_path / "frozen"), 16, repeats=1)
    assert set(blocks) == {"mamba block", "attention block", "mamba mixer", "attention mixer", "ffn"}
    assert all(t > 0 for t in blocks.values())


def test_decode_agreement_in_float64_paths_agree(load_example):
    rows = load_example("decode_agreement").main(["--preset", "tiny", "--dtype", "float64", "--ref", "float64",
                                                  "--new", "5", "--slots", "24", "40"])
    assert len(rows) == 4
    for r in rows:      # float64: dynamic, static (two buffer sizes) and full forward are one function
        assert r["dyn_full"] < 1e-9 and r["dyn_static24"] < 1e-9 and r["dyn_static40"] < 1e-9
        assert r["flips24"] == 0 and r["dyn_ref"] < 1e-9
