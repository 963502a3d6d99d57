"""Local task YAMLs on local JSON files through `lm_eval.simple_evaluate` with the elleci model: no network."""
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from elleci.algos import sequence_logprobs  # noqa: E402
from elleci.eval.generate import generate_until  # noqa: E402
from elleci.eval.lm_eval_tasks import flatten_results, run_harness  # noqa: E402
from elleci.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from elleci.eval.perplexity import evaluate_perplexity  # noqa: E402

# Three hand-made questions: a short right answer against a long wrong one (Q1, Q3) and a short wrong answer
# against a long right one (Q2), so the raw and the length-normalised argmax disagree.
MC3 = [{"question": "Qual è la capitale d'Italia?", "choices": ["Roma", "Milano, la città della moda e della finanza"],
        "answer": 0},
       {"question": "Di che colore è l'erba?", "choices": ["blu", "verde come le foglie degli alberi in primavera"],
        "answer": 1},
       {"question": "Quanti giorni ha una settimana?", "choices": ["7", "otto giorni, da lunedì a lunedì compreso"],
        "answer": 0}]
DOCS = ["Tre più quattro fa sette. Dopo lunedì viene martedì. Il cielo è azzurro e l'erba è verde. "
        "Cinque più due fa sette. Dopo giovedì viene venerdì. La neve è bianca e il limone è giallo. "
        "In inglese gatto si dice cat e cane si dice dog. Il mare è blu.",
        "Il gatto dorme sul divano.", "Uno, due, tre: la neve è bianca e il carbone è nero."]
PROMPTS = ["Tre più quattro fa", "Il cielo è", "Dopo lunedì viene"]
MAX_LENGTH = 96          # every multiple-choice request fits whole; the first document needs several windows

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""


def _write_task(d, name, rows, body):
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (d / f"{name}.yaml").write_text(YAML.format(name=name, data=d / f"{name}.jsonl", cache=d / "cache") + body,
                                    encoding="utf-8")


def _seq_logp(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    labels = ids.clone()
    labels[0, :len(ctx)] = -100
    with torch.no_grad():
        return float(sequence_logprobs(model, ids, labels)[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory, model, tok):
    d = tmp_path_factory.mktemp("tasks")
    _write_task(d, "elleci_mc3", MC3, 'output_type: multiple_choice\ndoc_to_text: "Domanda: {{question}}\\nRisposta:"\n'
                'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    _write_task(d, "elleci_ppl", [{"text": t} for t in DOCS],
                'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                '  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n')
    # targets: the model's own greedy answers for two prompts (cut at "."), a wrong one for the third
    greedy = generate_until(model, tok, [tok.encode(p) for p in PROMPTS], [["."]] * 3, max_new_tokens=10)
    targets = [greedy[0], greedy[1], greedy[2] + "§"]
    _write_task(d, "elleci_gen", [{"prompt": p, "answer": t} for p, t in zip(PROMPTS, targets)],
                'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                'target_delimiter: ""\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 10\n  do_sample: false\n'
                'metric_list:\n  - metric: exact_match\n')
    flat, out = run_harness(model, tok, ["elleci_mc3", "elleci_ppl", "elleci_gen"], include_path=str(d), batch_size=3,
                            max_length=MAX_LENGTH)
    return flat, out, d


def test_acc_and_acc_norm_equal_hand_computed_values(run, model, tok):
    flat, *_ = run
    acc, acc_norm = [], []
    for q in MC3:
        context = tok.encode(f"Domanda: {q['question']}\nRisposta:")
        lls = [_seq_logp(model, context, tok.encode(f"Domanda: {q['question']}\nRisposta: {c}")[len(context):])
               for c in q["choices"]]
        per_char = [ll / len(c) for ll, c in zip(lls, q["choices"])]      # lm-eval: len(choice) in characters
        acc.append(float(lls.index(max(lls)) == q["answer"]))
        acc_norm.append(float(per_char.index(max(per_char)) == q["answer"]))
    assert acc != acc_norm                                                   # the file tells the two apart
    assert flat["elleci_mc3/acc"] == pytest.approx(sum(acc) / 3, abs=1e-12)
    assert flat["elleci_mc3/acc_norm"] == pytest.approx(sum(acc_norm) / 3, abs=1e-12)
    assert (flat["elleci_mc3/acc"], flat["elleci_mc3/acc_norm"]) == pytest.approx((2 / 3, 1 / 3))
    assert flat["elleci_mc3/acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))   # [1, 0, 1]: sample var 1/3


def test_offline_multiple_choice_matches_the_harness(run, model, tok):
    flat, *_ = run
    metrics, samples = evaluate_multiple_choice(model, tok, MC3, template="Domanda: {question}\nRisposta:")
    assert metrics["acc"] == flat["elleci_mc3/acc"] and metrics["acc_norm"] == flat["elleci_mc3/acc_norm"]
    assert metrics["acc_stderr"] == pytest.approx(flat["elleci_mc3/acc_stderr"], rel=1e-12)
    assert [s["pred"] for s in samples] != [s["pred_norm"] for s in samples]


def test_rolling_perplexity_matches_the_offline_perplexity(run, model, tok):
    flat, *_ = run
    assert len(tok.encode(DOCS[0])) > MAX_LENGTH                             # two windows at least
    ours, _ = evaluate_perplexity(model, tok, DOCS, max_length=MAX_LENGTH)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert flat[f"elleci_ppl/{key}"] == pytest.approx(ours[key], rel=1e-9)


def test_generate_until_through_the_harness(run):
    flat, out, _ = run
    assert flat["elleci_gen/exact_match"] == pytest.approx(2 / 3)           # the two targets that are its own greedy
    assert out["configs"]["elleci_gen"]["generation_kwargs"]["until"] == ["."]


def test_flatten_results_names():
    flat = flatten_results({"arc_it": {"alias": "arc_it", "acc,none": 0.25, "acc_stderr,none": 0.01,
                                       "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"},
                            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}})
    assert flat == {"arc_it/acc": 0.25, "arc_it/acc_stderr": 0.01, "arc_it/acc_norm": 0.5,
                    "gsm8k/exact_match/strict-match": 0.1, "gsm8k/exact_match/flexible-extract": 0.2}


def test_exported_task_scores_as_the_harness(run, model, tok, tmp_path):
    from elleci.eval.export import export_multiple_choice
    flat, _, d = run
    delimiter = export_multiple_choice("elleci_mc3", tmp_path / "mc3.jsonl", include_path=str(d))
    rows = [json.loads(line) for line in (tmp_path / "mc3.jsonl").read_text(encoding="utf-8").splitlines()]
    assert delimiter == " " and rows[0]["question"] == "Domanda: Qual è la capitale d'Italia?\nRisposta:"
    assert [r["answer"] for r in rows] == [q["answer"] for q in MC3]
    metrics, _ = evaluate_multiple_choice(model, tok, rows, target_delimiter=delimiter)
    assert (metrics["acc"], metrics["acc_norm"]) == (flat["elleci_mc3/acc"], flat["elleci_mc3/acc_norm"])
    assert len(export_multiple_choice("elleci_mc3", tmp_path / "two.jsonl", limit=2, include_path=str(d))) == 1
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="only single-answer multiple-choice"):
        export_multiple_choice("elleci_gen", tmp_path / "gen.jsonl", include_path=str(d))


def test_chat_formatted_run_uses_elleci_chatml(run, model, tok):
    import lm_eval
    from elleci.eval.harness import ElleciEvalLM
    from elleci.eval.lm_eval_tasks import task_manager
    from elleci.eval.scoring import encode_pair

    _, _, d = run
    seen = []

    class Recording(ElleciEvalLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            seen.extend(r.args for r in requests)
            return super().loglikelihood(requests, disable_tqdm)

    lm = Recording(model=model, tokenizer=tok, max_length=MAX_LENGTH)
    out = lm_eval.simple_evaluate(model=lm, tasks=["elleci_mc3"], task_manager=task_manager(["elleci_mc3"], str(d)),
                                  apply_chat_template=True, log_samples=False, bootstrap_iters=0)
    assert len(seen) == 6
    for (context, _), q in zip(seen[::2], MC3):
        assert context == f"<|im_start|>user\nDomanda: {q['question']}\nRisposta:<|im_end|>\n<|im_start|>assistant\n"
    lls = [_seq_logp(model, *encode_pair(tok, c, y)) for c, y in seen]
    acc = [float(max(range(2), key=lambda j: lls[2 * i + j]) == q["answer"]) for i, q in enumerate(MC3)]
    assert out["results"]["elleci_mc3"]["acc,none"] == pytest.approx(sum(acc) / 3)
