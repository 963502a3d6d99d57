"""Merge methods over state dicts (mergekit oracles, spec §1.7), the JSON config, and the CLI end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elleci.algos.merging.merge import (dare, dare_merge, linear_merge, merge, slerp, task_arithmetic, ties_combine,
                                ties_merge, trim_magnitude)
from elleci.algos.merging.merge_config import MergeConfig, load_merge_config, main, run_merge
from elleci.model import ElleciConfig, ElleciLM, Tokenizer

REPO = Path(__file__).resolve().parents[2]


def sd(**tensors):
    return {k: torch.as_tensor(v, dtype=torch.float32) if not isinstance(v, torch.Tensor) else v
            for k, v in tensors.items()}


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               rtol=0, atol=atol)


# ---- linear and task arithmetic ---------------------------------------------------------------------

def test_linear_merge_weights_dtypes_and_buffers():
    a = sd(w=[1.0, 2.0], n=torch.tensor([3, 4]), h=torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    b = sd(w=[3.0, 6.0], n=torch.tensor([3, 4]), h=torch.tensor([3.0, 4.0], dtype=torch.bfloat16))
    out = linear_merge([a, b])
    close(out["w"], [2.0, 4.0])
    assert out["h"].dtype == torch.bfloat16 and out["h"].tolist() == [2.0, 3.0]
    assert torch.equal(out["n"], a["n"]) and out["n"].dtype == torch.long
    close(linear_merge([a, b], weights=[3, 1])["w"], [1.5, 3.0])
    close(linear_merge([a, b], weights=[1, 1], normalize=False)["w"], [4.0, 8.0])
    with pytest.raises(ValueError, match="non-floating tensor"):
        linear_merge([a, dict(b, n=torch.tensor([3, 5]))])
    with pytest.raises(ValueError, match="w: shape"):
        linear_merge([a, dict(b, w=torch.zeros(3))])
    with pytest.raises(ValueError, match="different keys"):
        linear_merge([a, {k: v for k, v in b.items() if k != "h"}])


def test_task_arithmetic():
    base, m1, m2 = sd(w=[1.0, 1.0]), sd(w=[2.0, 0.0]), sd(w=[1.0, 3.0])
    close(task_arithmetic(base, [m1])["w"], m1["w"])                    # one model, λ = 1: that model
    # θ₀ + λ Σ w_i τ_i = (1,1) + 0.5·(2·(1,−1) + 1·(0,2)) = (2, 1)
    close(task_arithmetic(base, [m1, m2], weights=[2, 1], lam=0.5)["w"], [2.0, 1.0])
    close(task_arithmetic(base, [m1, m2], lam=0.0)["w"], base["w"])


# ---- TIES -------------------------------------------------------------------------------------------

TAU1, TAU2 = [0.5, -0.2, 0.1, 0.0], [-0.3, -0.4, 0.2, 0.6]


def test_ties_hand_case_steps():
    t1, t2 = trim_magnitude(torch.tensor(TAU1), 0.5), trim_magnitude(torch.tensor(TAU2), 0.5)
    close(t1, [0.5, -0.2, 0.0, 0.0])
    close(t2, [0.0, -0.4, 0.0, 0.6])
    close(ties_combine([t1, t2], [1.0, 1.0]), [0.5, -0.3, 0.0, 0.6])


@pytest.mark.parametrize("base", [[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 3.0]])
def test_ties_hand_case(base):
    b = torch.tensor(base)
    out = ties_merge(sd(w=b), [sd(w=b + torch.tensor(TAU1)), sd(w=b + torch.tensor(TAU2))], density=0.5)
    close(out["w"], b + torch.tensor([0.5, -0.3, 0.0, 0.6]))
    lam = ties_merge(sd(w=b), [sd(w=b + torch.tensor(TAU1)), sd(w=b + torch.tensor(TAU2))], density=0.5, lam=2.0)
    close(lam["w"], b + 2 * torch.tensor([0.5, -0.3, 0.0, 0.6]))


def test_ties_zero_sum_tie_goes_to_plus_and_single_model_is_identity():
    close(ties_combine([torch.tensor([0.3]), torch.tensor([-0.3])], [1.0, 1.0]), [0.3])
    base, m = sd(w=[0.0, 1.0, 2.0]), sd(w=[0.5, -1.0, 4.0])
    close(ties_merge(base, [m], density=1.0)["w"], m["w"])
    with pytest.raises(ValueError, match="density"):
        ties_merge(base, [m], density=0.0)


# ---- DARE -------------------------------------------------------------------------------------------

def test_dare_density_one_is_identity():
    tau = torch.randn(5, 7)
    for rescale in ("inverse", "l1", "none"):
        assert torch.equal(dare(tau, 1.0, rescale=rescale), tau)
    base, m1, m2 = sd(w=torch.randn(6)), sd(w=torch.randn(6)), sd(w=torch.randn(6))
    close(dare_merge(base, [m1], 1.0)["w"], m1["w"])
    close(dare_merge(base, [m1, m2], 1.0)["w"], task_arithmetic(base, [m1, m2])["w"])
    close(dare_merge(base, [m1, m2], 1.0, combine="ties")["w"], ties_merge(base, [m1, m2], density=1.0)["w"])


def test_dare_inverse_rescale_is_unbiased():
    tau = torch.linspace(-1, 1, 40)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([dare(tau, 0.3, generator=g) for _ in range(3000)])
    kept = (draws != 0).float().mean()
    assert abs(kept.item() - 0.3 * 39 / 40) < 0.02                      # one entry of τ is exactly 0
    nz = draws[draws != 0] / tau.expand_as(draws)[draws != 0]
    close(nz, torch.full_like(nz, 1 / 0.3), atol=1e-5)                    # survivors scaled by 1/density
    assert ((draws.mean(0) - tau).abs() <= 0.12 * tau.abs() + 1e-6).all()   # E[τ̃] = τ (Monte Carlo)


def test_dare_l1_keeps_norm_and_is_seeded():
    tau = torch.randn(50)
    out = dare(tau, 0.4, rescale="l1", generator=torch.Generator().manual_seed(1))
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    base, m1, m2 = sd(w=torch.zeros(200)), sd(w=torch.randn(200)), sd(w=torch.randn(200))
    a = dare_merge(base, [m1, m2], 0.5, seed=3)
    assert torch.equal(a["w"], dare_merge(base, [m1, m2], 0.5, seed=3)["w"])
    assert not torch.equal(a["w"], dare_merge(base, [m1, m2], 0.5, seed=4)["w"])
    with pytest.raises(ValueError, match="rescale"):
        dare(tau, 0.5, rescale="max")


# ---- SLERP ------------------------------------------------------------------------------------------

def test_slerp_hand_case_and_endpoints():
    a, b = sd(v=[1.0, 0.0], n=torch.tensor([7])), sd(v=[0.0, 2.0], n=torch.tensor([7]))
    close(slerp(a, b, 0.5)["v"], [0.7071, 1.4142], atol=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = sd(w=torch.randn(4, 5, generator=g)), sd(w=torch.randn(4, 5, generator=g))
    assert torch.equal(slerp(x, y, 0.0)["w"], x["w"]) and torch.equal(slerp(x, y, 1.0)["w"], y["w"])
    assert torch.equal(slerp(a, b, 0.3)["n"], a["n"])


def test_slerp_colinear_falls_back_to_lerp():
    a, b = sd(v=[1.0, 2.0, 3.0]), sd(v=[2.0, 4.0, 6.0])
    close(slerp(a, b, 0.5)["v"], [1.5, 3.0, 4.5])
    close(slerp(sd(v=[0.0, 0.0]), sd(v=[2.0, 4.0]), 0.25)["v"], [0.5, 1.0])   # zero tensor: lerp
    with pytest.raises(ValueError, match="t must be"):
        slerp(a, b, 1.5)


# ---- config ----------------------------------------------------------------------------------------

GOOD = {"method": "ties", "base": "b", "models": ["m1", "m2"], "params": {"density": 0.3}, "output": "o"}


@pytest.mark.parametrize("change, match", [
    ({"method": "fisher"}, "unknown merge method"),
    ({"output": None}, "missing required key"),
    ({"extra": 1}, "unknown config key"),
    ({"base": None}, "needs a 'base'"),
    ({"method": "linear", "params": {}}, "does not use a 'base'"),
    ({"method": "slerp", "base": None, "models": ["a", "b", "c"], "params": {"t": 0.5}}, "exactly 2 models"),
    ({"params": {"densty": 0.3}}, "allowed"),
    ({"method": "dare_linear", "params": {}}, "required"),
    ({"weights": [1.0]}, "one number per model"),
    ({"method": "regmean", "base": None, "params": {}}, "gram_data"),
    ({"method": "regmean", "base": None, "params": {}, "gram_data": {"files": ["a"]}}, "one path per model"),
    ({"method": "regmean", "base": None, "params": {}, "gram_data": {}}, "exactly one of"),
    ({"gram_data": {"grams": ["a", "b"]}}, "used by no other method"),
])
def test_config_validation_errors(tmp_path, change, match):
    d = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "merge.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        load_merge_config(path)


def test_config_loads_and_reports_bad_json(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps(GOOD))
    cfg = load_merge_config(tmp_path / "ok.json")
    assert cfg.method == "ties" and cfg.params == {"density": 0.3} and cfg.base == "b"
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        load_merge_config(tmp_path / "bad.json")
    with pytest.raises(SystemExit) as exit_info:                          # the CLI: a one-line error, status 2
        main([str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="unknown merge method"):
        merge("average", [{}])


# ---- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Three tiny models (base, it, en) saved with a small SentencePiece tokenizer, plus Gram data files."""
    root = tmp_path_factory.mktemp("merge")
    words = "il gatto la casa the cat a house bella big piccola small rossa red".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 5)) for i in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = Tokenizer.train(root / "corpus.txt", vocab_size=300, num_threads=1)
    dirs = []
    for seed, name in enumerate(["base", "it", "en"]):
        torch.manual_seed(seed)
        ElleciLM(ElleciConfig.from_name("tiny")).save_pretrained(root / name, tokenizer=tok)
        dirs.append(str(root / name))
    (root / "it.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines[:12]) + "\n")
    chats = [{"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}
             for i in range(10)]
    (root / "en.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return root, dirs


def test_cli_linear_end_to_end(saved_models, tmp_path):
    root, (base, it, en) = saved_models
    cfg = {"method": "linear", "models": [it, en], "weights": [3.0, 1.0], "output": str(tmp_path / "out")}
    (tmp_path / "merge.json").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "elleci.algos.merging", str(tmp_path / "merge.json")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    merged = ElleciLM.from_pretrained(tmp_path / "out").state_dict()
    a, b = ElleciLM.from_pretrained(it).state_dict(), ElleciLM.from_pretrained(en).state_dict()
    for k in ("lm_head.weight", "blocks.0.attn.A_log", "blocks.1.ffn.w3.weight"):
        torch.testing.assert_close(merged[k], 0.75 * a[k] + 0.25 * b[k], msg=k)
    assert Tokenizer.load(tmp_path / "out").vocab_size == 300
    assert json.loads((tmp_path / "out" / "merge_config.json").read_text())["method"] == "linear"


def test_run_merge_regmean_from_text_and_chat_data(saved_models, tmp_path):
    from elleci.algos.merging.regmean import load_grams
    root, (base, it, en) = saved_models
    gram_files = [str(tmp_path / "g_it.safetensors"), str(tmp_path / "g_en.safetensors")]
    cfg = {"method": "regmean", "models": [it, en], "params": {"alpha": 0.9}, "output": str(tmp_path / "rm"),
           "gram_data": {"files": [str(root / "it.jsonl"), str(root / "en.jsonl")], "batch_size": 16,
                         "max_length": 32, "save_grams": gram_files}}
    merged = run_merge(cfg)
    model = ElleciLM.from_pretrained(tmp_path / "rm")
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    assert torch.isfinite(model(torch.randint(4, 300, (1, 8)))).all()
    grams = [load_grams(p) for p in gram_files]
    assert "blocks.1.ffn.w1" in grams[0] and not torch.equal(grams[0]["lm_head"], grams[1]["lm_head"])
    # the same merge from the saved Grams (RegMean on lm_head only, to keep the test fast)
    again = run_merge({**cfg, "output": str(tmp_path / "rm2"), "gram_data": {"grams": gram_files},
                       "params": {"alpha": 0.9, "exclude": "^(?!lm_head)"}})
    for k in ("lm_head.weight", "token_emb.weight", "blocks.0.attn.A_log"):
        torch.testing.assert_close(again[k], merged[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(again["blocks.1.ffn.w1.weight"], merged["blocks.1.ffn.w1.weight"])  # excluded: mean


def test_run_merge_task_vector_methods(saved_models, tmp_path):
    root, (base, it, en) = saved_models
    out = run_merge(MergeConfig.from_dict({"method": "dare_ties", "base": base, "models": [it, en],
                                           "params": {"density": 0.5, "seed": 1}, "output": str(tmp_path / "d")}))
    b = ElleciLM.from_pretrained(base).state_dict()
    assert not torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    ta = run_merge({"method": "task_arithmetic", "base": base, "models": [it], "output": str(tmp_path / "t")})
    a = ElleciLM.from_pretrained(it).state_dict()
    for k in ("lm_head.weight", "blocks.0.attn.in_proj.weight"):
        torch.testing.assert_close(ta[k], a[k], msg=k)
