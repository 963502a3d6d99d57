"""Offline evaluations (no lm-eval needed): multiple choice, perplexity, verified generation, win rate, run_tasks."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from elleci.algos import PairwiseLabeler, sequence_logprobs
from elleci.eval import run_tasks
from elleci.eval.generate import generate_until
from elleci.eval.multiple_choice import mean_stderr, predictions, read_multiple_choice
from elleci.eval.perplexity import evaluate_perplexity
from elleci.eval.scoring import encode_pair, score_continuations, score_rolling
from elleci.eval.tasks import check_task
from elleci.eval.verified_generation import contains_answer, evaluate_generation, exact_match, normalise
from elleci.eval.win_rate import chat_answers, evaluate_win_rate

DATA = Path(__file__).resolve().parents[2] / "configs" / "eval" / "data"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _seq_logp(model, ctx, cont):
    ids = torch.tensor([list(ctx) + list(cont)])
    labels = ids.clone()
    labels[0, :len(ctx)] = -100
    with torch.no_grad():
        return float(sequence_logprobs(model, ids, labels)[0])


# ---- multiple choice -------------------------------------------------------------------------------

def test_predictions_hand_values():
    # raw: -4 > -6 picks 0; per character: -4/2 = -2 < -6/6 = -1 picks 1
    assert predictions([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)
    # characters, not bytes: "città" is 5 characters (6 bytes); -5/5 = -1 beats -2.2/2 = -1.1
    assert predictions([-2.2, -5.0], ["no", "città"]) == (0, 1)
    assert predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)               # ties: the first choice
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)


def test_read_multiple_choice_checks_every_record(tmp_path):
    good = _jsonl(tmp_path / "ok.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": "b"},
                                          {"question": "R?", "choices": ["c", "d", "e"], "answer": 2}])
    assert [r["answer"] for r in read_multiple_choice(good)] == [1, 2]
    assert len(read_multiple_choice(good, limit=1)) == 1
    for bad, msg in [({"question": "Q?", "choices": ["a"], "answer": 0}, "at least 2"),
                     ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, r"outside \[0, 2\)"),
                     ({"question": "Q?", "choices": ["a", "b"], "answer": "z"}, "not one of the choices"),
                     ({"choices": ["a", "b"], "answer": 0}, "'question'")]:
        path = _jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["x", "y"], "answer": 0}, bad])
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{msg}"):
            read_multiple_choice(path)


def test_encode_pair_is_the_harness_convention(tok):
    ctx, cont = encode_pair(tok, "Il cielo è ", "azzurro")
    assert ctx == tok.encode("Il cielo è") and ctx + cont == tok.encode("Il cielo è azzurro")
    assert encode_pair(tok, "", "Roma") == ([tok.eos_id], tok.encode("Roma"))


def test_shipped_multiple_choice_file_runs(model, tok):
    metrics = run_tasks(model, tok, [{"type": "multiple_choice", "path": str(DATA / "mc_it.jsonl"), "limit": 4,
                                      "template": "Domanda: {question}\nRisposta:"}])
    assert set(metrics) == {f"eval/mc_it/{k}" for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for k, v in metrics.items() if not k.endswith("stderr"))


# ---- perplexity -----------------------------------------------------------------------------------

def test_perplexity_hand_formulas(model, tok):
    docs = ["Il cielo è azzurro.", "Tre più quattro fa sette. Dopo lunedì viene martedì.", "Città e perché"]
    metrics, samples = evaluate_perplexity(model, tok, docs, max_length=2048)
    lls = [_seq_logp(model, [tok.eos_id], tok.encode(d)) for d in docs]       # one window each: EOS, then the text
    assert [s["loglikelihood"] for s in samples] == pytest.approx(lls, abs=1e-9)
    n_tok = sum(len(tok.encode(d)) for d in docs)
    n_words = 4 + 9 + 3
    n_bytes = sum(len(d.encode()) for d in docs)
    assert n_bytes == sum(len(d) for d in docs) + 1 + 3 + 2                  # è; ù ì ì; à é: two bytes each
    assert metrics["token_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_tok), rel=1e-12)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_words), rel=1e-12)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-12)
    assert metrics["bits_per_byte"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-12)


def test_rolling_score_covers_every_token_once(model, tok):
    doc = tok.encode("Tre più quattro fa sette. Dopo lunedì viene martedì. Il cielo è azzurro.")
    assert len(doc) > 25
    total, = score_rolling(model, [doc], prefix_token=tok.eos_id, max_length=10)
    expected, done = _seq_logp(model, [tok.eos_id], doc[:10]), 10           # EOS, then the first 10 tokens
    while done < len(doc):                                                   # then up to 10 more, reading 10 before
        end = min(done + 10, len(doc))
        expected += _seq_logp(model, doc[end - 11:done], doc[done:end])
        done = end
    assert total == pytest.approx(expected, abs=1e-9)


# ---- verified generation ------------------------------------------------------------------------------

def test_normalise_and_builtin_verifiers():
    assert normalise("  La  Capitale è ROMA. ") == "la capitale è roma"
    assert exact_match({"answer": "Roma"}, " roma.") and not exact_match({"answer": "Roma"}, "Roma antica")
    assert exact_match({"answer": ["sette", "7"]}, "7")
    assert contains_answer({"answer": "Roma"}, "È Roma, credo.") and not contains_answer({"answer": "Roma"}, "Romano")
    with pytest.raises(ValueError, match="answer"):
        exact_match({"prompt": "x"}, "y")


def test_generation_score_is_the_verifier_mean(model, tok, tmp_path):
    prompts = ["Tre più quattro fa", "Il cielo è", "Dopo lunedì viene", "Uno due"]
    texts = generate_until(model, tok, [tok.encode(p) for p in prompts], [["."]] * 4, max_new_tokens=12)
    answers = [texts[0], texts[1], "§", "§"]                                 # two right by construction
    path = _jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": a, "until": ["."]} for p, a in zip(prompts, answers)])
    metrics = run_tasks(model, tok, [{"type": "generation", "path": str(path), "max_new_tokens": 12,
                                      "verifier": "elleci.eval.verified_generation:exact_match"}])
    assert metrics == {"eval/gen/score": 0.5}
    with pytest.raises(ValueError, match=r"expected a value in \[0, 1\]"):
        evaluate_generation(model, tok, [{"prompt": "Il"}], verifier=lambda r, t: 2.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="not found"):
        evaluate_generation(model, tok, [{"prompt": "Il"}], verifier="elleci.eval:nope")


# ---- win rate ---------------------------------------------------------------------------------------

PROMPTS = ["Quanto fa tre più quattro?", "Di che colore è il cielo?", "Che giorno viene dopo lunedì?"]


def test_win_rate_against_itself_is_one_half(model, tok):
    metrics, samples = evaluate_win_rate(model, tok, model, tok, model, tok, PROMPTS, max_new_tokens=6)
    assert metrics["win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert all(s["model"] == s["baseline"] for s in samples)


def test_win_rate_is_the_labelers_swap_debiased_preference(tok, make_model):
    a, b, judge = make_model(tok, seed=1), make_model(tok, seed=2), make_model(tok, seed=3)
    ab, samples = evaluate_win_rate(a, tok, b, tok, judge, tok, PROMPTS, max_new_tokens=6)
    ba, _ = evaluate_win_rate(b, tok, a, tok, judge, tok, PROMPTS, max_new_tokens=6)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0, abs=1e-6)   # swapping makes it antisymmetric
    ra, rb = chat_answers(a, tok, PROMPTS, max_new_tokens=6), chat_answers(b, tok, PROMPTS, max_new_tokens=6)
    assert [s["model"] for s in samples] == ra and ra != rb
    p = PairwiseLabeler(judge, tok, "it", swap=True).label(PROMPTS, ra, rb).double()
    assert ab["win_rate"] == pytest.approx(float(p.mean()), abs=1e-6)
    assert ab["win_rate_hard"] == pytest.approx(float((p > 0.5).double().mean()), abs=1e-12)


# ---- run_tasks ---------------------------------------------------------------------------------------

def test_run_tasks_contract(model, tok, tmp_path):
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["sì", "no"], "answer": 0}])
    ppl = _jsonl(tmp_path / "ppl.jsonl", [{"text": "Il cielo è azzurro."}])
    model.train()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    tasks = [{"type": "multiple_choice", "path": str(mc)}, {"type": "perplexity", "path": str(ppl), "name": "cielo"}]
    if _has_lm_eval():
        tasks.append({"type": "lm_eval", "tasks": ["elleci_unused"], "include_path": str(_tiny_task(tmp_path))})
    metrics = run_tasks(model, tok, tasks)
    after = random.random(), float(np.random.rand()), float(torch.rand(()))
    assert after == before                                                  # global random states untouched
    assert model.training                                                   # mode restored
    model.eval()
    assert all(isinstance(v, float) for v in metrics.values())
    assert {"eval/mc/acc", "eval/mc/acc_norm", "eval/cielo/word_perplexity"} <= set(metrics)
    assert all(k.startswith("eval/") and k.count("/") >= 2 for k in metrics)
    ctx, cont = encode_pair(tok, "Q?", " sì")
    ctx2, cont2 = encode_pair(tok, "Q?", " no")
    (l1, _), (l2, _) = score_continuations(model, [(ctx, cont), (ctx2, cont2)])
    assert metrics["eval/mc/acc"] == float(l1 >= l2)


def _has_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _tiny_task(tmp_path):
    d = tmp_path / "lm_tasks"
    d.mkdir()
    _jsonl(d / "one.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0}])
    (d / "one.yaml").write_text(f"task: elleci_unused\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                f"    test: {d / 'one.jsonl'}\n  cache_dir: {d / 'cache'}\ntest_split: test\n"
                                "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                                "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    return d


def test_bad_tasks_fail_before_anything_runs(model, tok, tmp_path):
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["sì", "no"], "answer": 0}])
    calls = []
    tasks = [{"type": "generation", "path": str(mc), "verifier": lambda r, t: calls.append(t) or 1.0},
             {"type": "multiple_choice", "path": str(mc), "templat": "{question}"}]
    with pytest.raises(ValueError, match=r"tasks\[1\] \(multiple_choice\): unknown key\(s\) \['templat'\]"):
        run_tasks(model, tok, tasks)
    assert calls == []
    with pytest.raises(ValueError, match="type='mcq'"):
        check_task({"type": "mcq"})
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        check_task({"type": "perplexity", "path": "nope.jsonl"})
    with pytest.raises(ValueError, match="limit=0 must be a positive integer"):
        check_task({"type": "multiple_choice", "path": str(mc), "limit": 0})
    with pytest.raises(ValueError, match="missing \\['verifier'\\]"):
        check_task({"type": "generation", "path": str(mc)})
    with pytest.raises(ValueError, match="come from two tasks"):
        run_tasks(model, tok, [{"type": "multiple_choice", "path": str(mc)}] * 2)


def test_offline_evaluations_need_no_lm_eval():
    import subprocess
    import sys
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import elleci.eval\n"
            "from elleci.eval.tasks import run_task\n"
            "try:\n"
            "    run_task(None, None, {'type': 'lm_eval', 'tasks': ['arc_it']})\n"
            "except ImportError as e:\n"
            "    print('needs', 'elleci[eval]' in str(e))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and res.stdout.strip() == "needs True", res.stderr


def test_bench_eval_smoke(load_example, capsys):
    args = ["--preset", "tiny", "--requests", "6", "--batch", "1", "3", "--ctx", "4", "9", "--cont", "1", "3"]
    assert load_example("bench_eval").main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert len(rows) == 2 and rows[0].split("|")[5].strip() == "1.00×"
    assert float(rows[1].split("|")[6]) < 1e-3                      # batching changes scores by rounding only
