"""Synthetic data generation and curation (elleci.algos.synth*): the spec's oracles (§4), hand-derived golden
values for dedup / distinct-n / self-similarity / self-BLEU, near-duplicates on constructed pairs, a full
pipeline run with a stub teacher, an ElleciLM teacher, and the quick example."""
import json
import math
import random
from collections import Counter

import pytest
import torch

from elleci.algos.rlaif import DirectScorer
from elleci.algos.synth import (AttributeGrid, CallableTeacher, LMTeacher, TaskSpec, build_prompts, generate,
                                grow_pool, read_records, render_prompt, select_demos, synthesize, write_records)
from elleci.algos.synth_filters import (Filter, apply_filters, decontamination_filter, exact_dedup_filter,
                                        exact_duplicates, jaccard, judge_filter, length_filter, lsh_bands,
                                        minhash_jaccard, minhash_signatures, near_dedup_filter, near_duplicates,
                                        regex_filter, rule_filter, self_consistency_filter, shingles,
                                        verifier_filter)
from elleci.algos.synth_metrics import (dataset_report, distinct_n, inverse_frequency_weights, normalise_weights,
                                        pass_rate, score_weights, self_bleu, self_similarity, weighted_batches,
                                        with_weights)
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.tasks import arithmetic

SPEC = TaskSpec("arithmetic", "You write worked solutions.", output_format="End with 'Answer: <n>'.")
GRID = AttributeGrid({"level": [1, 3], "operations": ["+", "+ -"]}, probs={"level": [0.25, 0.75]},
                     allowed=lambda a: not (a["level"] == 1 and a["operations"] == "+ -"))
VOCAB = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _random_text(rng, n_words=30):
    return " ".join(rng.choice(VOCAB) + str(rng.randrange(50)) for _ in range(n_words))


# ----------------------------------------------------------------------------- diversity metrics

def test_distinct_n_golden_and_oracles():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)       # a b c a b d: 4 unique of 6
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)       # ab bc ab bd
    assert distinct_n(["A b", "a B"], 2) == pytest.approx(1 / 2)            # case-folded
    unique = [" ".join(f"w{i}_{j}" for j in range(5)) for i in range(4)]
    assert distinct_n(unique, 2) == 1.0                                     # oracle: unique n-grams → 1
    for N in (1, 3, 7):
        assert distinct_n([unique[0]] * N, 2) == pytest.approx(1 / N)       # oracle: N identical → 1/N
    with pytest.raises(ValueError, match="no word 3-gram"):
        distinct_n(["a b"], 3)


def test_self_similarity_and_self_bleu_golden():
    # bigram sets {ab, bc}, {ab, bd}, {xy}: J = 1/3, 0, 0
    assert self_similarity(["a b c", "a b d", "x y"], 2) == pytest.approx((1 / 3) / 3)
    assert self_similarity(["a b c"] * 4, 2) == 1.0
    # "a b" vs ref "a c": p1 = 1/2, p2 = (0 + 1) / (1 + 1), BP = 1 → exp(½ log ¼) = ½; symmetric
    assert self_bleu(["a b", "a c"], max_n=2) == pytest.approx(0.5)
    assert self_bleu(["p q r s t"] * 3) == pytest.approx(1.0)
    assert self_bleu(["p q r s", "w x y z"]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        self_similarity(["only one"])


# ----------------------------------------------------------------------------- dedup

def test_exact_dedup_golden_and_idempotent():
    assert exact_duplicates(["A b", "a  B", "c", "a b"]) == [None, 0, None, 0]
    recs = [{"id": str(i), "output": t} for i, t in enumerate(["x y", "X  y", "z", "x y", "w"])]
    kept, rejected, stats = apply_filters(recs, [exact_dedup_filter()])
    assert [r["id"] for r in kept] == ["0", "2", "4"] and {r["rejected_by"] for r in rejected} == {"exact_dedup"}
    again, _, _ = apply_filters(kept, [exact_dedup_filter()])
    assert [r["id"] for r in again] == [r["id"] for r in kept]              # oracle: dedup is idempotent
    near, _, _ = apply_filters(recs, [near_dedup_filter(0.8, n=1)])
    assert [r["id"] for r in apply_filters(near, [near_dedup_filter(0.8, n=1)])[0]] == [r["id"] for r in near]


def test_near_duplicate_constructed_pair():
    rng = random.Random(0)
    base = [f"w{i}" for i in range(30)]                      # 30 distinct words → 28 distinct 3-grams
    edited = base[:15] + ["CHANGED"] + base[16:]             # one middle word: 3 shingles differ on each side
    a, b = " ".join(base), " ".join(edited)
    assert jaccard(shingles(a, 3), shingles(b, 3)) == pytest.approx(25 / 31)   # 25 shared, 31 in the union
    sig = minhash_signatures([a, b, _random_text(rng)], n=3, num_perm=256, seed=1)
    assert abs(minhash_jaccard(sig[0], sig[1]) - 25 / 31) < 0.12             # σ ≈ 0.025 at 256 perms
    assert minhash_jaccard(sig[0], sig[2]) < 0.1
    other = _random_text(rng)
    assert near_duplicates([a, other, b], threshold=0.75) == [None, None, 0]
    assert near_duplicates([a, other, b], threshold=0.9) == [None, None, None]  # J = 0.806 < 0.9


def test_near_dedup_lsh_equals_exact_all_pairs():
    rng = random.Random(3)
    texts = [_random_text(rng) for _ in range(25)]
    for i in range(0, 25, 3):                                 # plant near copies (one word edited)
        w = texts[i].split()
        w[rng.randrange(len(w))] = "EDIT"
        texts.append(" ".join(w))
    rng.shuffle(texts)
    lsh = near_duplicates(texts, threshold=0.7, n=3, num_perm=128, seed=0)
    assert lsh == near_duplicates(texts, threshold=0.7, n=3, exact=True)
    assert sum(d is not None for d in lsh) == 9


def test_lsh_bands_recall_and_maximal_rows():
    for t, m in ((0.8, 128), (0.5, 64), (0.9, 100)):
        b, r = lsh_bands(t, m)
        assert b * r == m and 1 - (1 - t ** r) ** b >= 0.99
        bigger = [q for q in range(r + 1, m + 1) if m % q == 0]
        assert all(1 - (1 - t ** q) ** (m // q) < 0.99 for q in bigger)


# ----------------------------------------------------------------------------- attributes and prompts

def test_attribute_sampler_chi_square_and_seed():
    cells = GRID.cells()
    assert len(cells) == 3 and sum(GRID.probability(c) for c in cells) == pytest.approx(1.0)
    # P ∝ (¼·½, ¾·½, ¾·½) over (1,+), (3,+), (3,+ -) → (1/7, 3/7, 3/7)
    assert [GRID.probability(c) for c in cells] == pytest.approx([1 / 7, 3 / 7, 3 / 7])
    draws = GRID.sample(4000, seed=0)
    counts = Counter((d["level"], d["operations"]) for d in draws)
    chi2 = lambda probs: sum((counts[(c["level"], c["operations"])] - 4000 * p) ** 2 / (4000 * p)
                             for c, p in zip(cells, probs))
    assert chi2([GRID.probability(c) for c in cells]) < 13.82        # χ²(df=2) 0.999 quantile
    assert chi2([1 / 3, 1 / 3, 1 / 3]) > 13.82                       # and the test has power against uniform
    assert GRID.sample(50, seed=1) == GRID.sample(50, seed=1) != GRID.sample(50, seed=2)
    with pytest.raises(ValueError, match="probs\\['level'\\] must be 2"):
        AttributeGrid({"level": [1, 3]}, probs={"level": [1.0]})
    with pytest.raises(ValueError, match="no allowed combination"):
        AttributeGrid({"level": [1]}, allowed=lambda a: False)


def _pool():
    train = arithmetic.make_problems(60, seed=0, levels=(1, 3))
    return [{"id": f"d{i}", "input": p.question, "output": p.solution,
             "attributes": {"level": p.level, "operations": "+ -" if "-" in p.question else "+"}}
            for i, p in enumerate(train)]


def _pick_question(attrs, rng):
    ops = attrs["operations"]
    while True:
        p = arithmetic.make_problems(1, seed=rng.randrange(10 ** 6), levels=(attrs["level"],))[0]
        if ("-" in p.question) == (ops == "+ -"):
            return p.question


def _problem(question):
    tokens = question.removesuffix(" = ?").split()
    return arithmetic.make_problem([int(t) for t in tokens[0::2]], tokens[1::2], level=1)


def test_fixed_seed_reproduces_prompt_set_and_demos_match():
    pool = _pool()
    kw = dict(input_fn=_pick_question, demo_pool=pool, k_demos=2)
    a, b = build_prompts(SPEC, GRID, 12, seed=7, **kw), build_prompts(SPEC, GRID, 12, seed=7, **kw)
    assert a == b and a != build_prompts(SPEC, GRID, 12, seed=8, **kw)     # oracle: same seed, same prompts
    by_id = {d["id"]: d for d in pool}
    for it in a:
        roles = [m["role"] for m in it["prompt"]]
        assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
        assert f"level={it['attributes']['level']}" in it["prompt"][0]["content"]
        assert it["prompt"][-1]["content"] == it["input"]
        assert all(by_id[d]["attributes"] == it["attributes"] for d in it["demos"])   # relevance by attributes
    inline = render_prompt(SPEC, {"level": 1}, pool[:2], "1 + 1 = ?", style="inline")
    assert len(inline) == 2 and inline[1]["content"].count("Example:") == 2
    assert inline[1]["content"].endswith("1 + 1 = ?")


def test_select_demos_similar_and_errors():
    pool = [{"id": "x", "input": "the cat sat there"}, {"id": "y", "input": "a dog ran far"},
            {"id": "z", "input": "cat sat on"}]
    got = select_demos(pool, 2, random.Random(0), query="the cat sat on", strategy="similar")
    assert [d["id"] for d in got] == ["z", "x"]                  # J = 2/3, 2/4, 0
    with pytest.raises(ValueError, match="fewer than k=4"):
        select_demos(pool, 4, random.Random(0))
    with pytest.raises(ValueError, match="unknown demo strategy"):
        select_demos(pool, 1, random.Random(0), strategy="nearest")
    assert [d["id"] for d in grow_pool(pool[:1], [{"id": "r", "input": "q", "output": "o"}])] == ["x", "r"]
    terse = TaskSpec("t", "Solve:", attribute_template="level {level}: {operations}", output_format="Be brief.")
    assert terse.system({"level": 3, "operations": "+ -"}) == "Solve:\nlevel 3: + -\nBe brief."
    assert SPEC.system({"level": 1}) == "You write worked solutions.\nAttributes: level=1\nEnd with 'Answer: <n>'."
    label_first = TaskSpec("sentiment", "Write reviews.", labels=("pos", "neg"), request="Write a {label} review.")
    items = build_prompts(label_first, AttributeGrid({"label": ["pos", "neg"]}), 4, seed=0)
    assert [it["prompt"][-1]["content"] for it in items] == [f"Write a {it['attributes']['label']} review."
                                                              for it in items]
    assert items[0]["prompt"][0]["content"].endswith("Labels: pos, neg") and items[0]["input"] is None
    bare = TaskSpec("t", "", show_attributes=False)
    assert render_prompt(bare, {"level": 3}, [], "1 + 1 = ?") == [{"role": "user", "content": "1 + 1 = ?"}]
    with pytest.raises(ValueError, match="attribute_template needs the attributes \\['operations'\\]"):
        terse.system({"level": 3})
    with pytest.raises(ValueError, match="needs the attributes \\['tone'\\]"):
        TaskSpec("t", "i", request="{input} in a {tone} tone").user("q", {})


# ----------------------------------------------------------------------------- filters and weights

def test_filters_are_monotone():
    rng = random.Random(0)
    recs = [{"id": str(i), "output": " ".join(rng.choice("abc") for _ in range(rng.randint(1, 6)))}
            for i in range(80)]
    rules = [length_filter(2, 5), regex_filter("a"), rule_filter("no_cc", lambda r: "c c" not in r["output"])]
    dedups = [exact_dedup_filter(), near_dedup_filter(0.5, n=1)]
    ids = lambda fs: {r["id"] for r in apply_filters(recs, fs)[0]}
    for k in range(len(rules) + 1):
        for g in rules + dedups:
            if g in rules[:k]:
                continue
            assert ids(rules[:k] + [g]) <= ids(rules[:k])                       # oracle: never adds samples
    perm = rules[::-1]
    assert ids(perm) == ids(rules) == ids(rules[:1]) & ids(rules[1:2]) & ids(rules[2:])   # rules: order-free


def test_weights_normalised_and_sampling():
    recs = [{"attributes": {"level": lv}} for lv in (1, 1, 3)]
    w = inverse_frequency_weights(recs, ["level"])
    assert w == pytest.approx([0.25, 0.25, 0.5]) and sum(w) == pytest.approx(1.0)   # each cell ½
    s = score_weights([0.0, math.log(3.0)])
    assert s == pytest.approx([0.25, 0.75]) and sum(s) == pytest.approx(1.0)        # oracle: sums to 1
    assert score_weights([1.0, 5.0], temperature=1e6) == pytest.approx([0.5, 0.5], abs=1e-5)
    assert [r["weight"] for r in with_weights(recs, [2.0, 2.0, 4.0])] == pytest.approx([0.25, 0.25, 0.5])
    batch_fn = weighted_batches(list("abc"), [0.0, 1.0, 3.0], 4000, seed=0, collate_fn=list)
    c = Counter(batch_fn(0))
    assert c["a"] == 0 and abs(c["c"] / 4000 - 0.75) < 0.03
    with pytest.raises(ValueError, match="finite non-negative"):
        normalise_weights([1.0, -1.0])
    with pytest.raises(ValueError, match="lack the attributes"):
        inverse_frequency_weights(recs, ["style"])


def test_judge_consistency_and_decontamination_golden():
    recs = [{"id": f"p{g}-s{j}", "prompt_id": f"p{g}", "prompt": "q", "output": o}
            for g, outs in enumerate([["good", "bad", "good"], ["meh"]]) for j, o in enumerate(outs)]

    class StubLabeler:                                        # P(a ≻ b): good beats anything else 0.9, else 0.5
        def label(self, prompts, a, b):
            return torch.tensor([0.9 if x == "good" and y != "good" else 0.1 if y == "good" and x != "good"
                                 else 0.5 for x, y in zip(a, b)])
    kept, _, _ = apply_filters(recs, [judge_filter(StubLabeler(), threshold=0.6)])
    # group p0: good vs bad 0.9, good vs good 0.5 → (0.9 + 0.5)/2 = 0.7 each good; bad 0.1; "meh" alone 0.5
    assert [r["id"] for r in kept] == ["p0-s0", "p0-s2"] and kept[0]["scores"]["judge"] == pytest.approx(0.7)

    class StubScorer:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])
    assert [r["id"] for r in apply_filters(recs, [judge_filter(StubScorer(), top_fraction=0.5)])[0]] == \
        ["p0-s0", "p0-s2"]                                    # lengths 4,3,4,3: top half, ties kept
    answers = [{"id": f"i{j}", "prompt_id": "p", "output": o} for j, o in enumerate(["Answer: 4", "Answer: 4",
                                                                                      "Answer: 5", "junk"])]
    kept, _, _ = apply_filters(answers, [self_consistency_filter(arithmetic.extract_answer, min_agreement=0.5)])
    assert [r["id"] for r in kept] == ["i0", "i1"] and kept[0]["scores"]["self_consistency"] == 0.5
    assert apply_filters(answers, [self_consistency_filter(arithmetic.extract_answer, min_agreement=0.6)])[0] == []
    contam = [{"id": "a", "input": "3 + 4 = ?", "output": ""}, {"id": "b", "input": "3 + 5 = ?", "output": ""}]
    assert [r["id"] for r in apply_filters(contam, [decontamination_filter(["3 + 4 = ?"], n=13)])[0]] == ["b"]
    with pytest.raises(ValueError, match="exactly one of threshold and top_fraction"):
        judge_filter(StubScorer())


# ----------------------------------------------------------------------------- the pipeline end to end

def test_full_pipeline_stub_teacher_jsonl_and_provenance(tmp_path):
    items = build_prompts(SPEC, GRID, 6, seed=3, input_fn=_pick_question, demo_pool=_pool(), k_demos=1)
    problems = {it["input"]: _problem(it["input"]) for it in items}
    distinct = len(problems)

    def teacher(prompts):                                     # sample 0 right, sample 1 a copy, sample 2 wrong
        out = []
        for i, p in enumerate(prompts):
            prob = problems[p[-1]["content"]]
            out.append(prob.solution if i % 3 < 2 else prob.solution.replace("Answer:", "Answer: 1"))
        return out
    check = verifier_filter(lambda r: arithmetic.verify(problems[r["input"]], r["output"]))
    kept, rejected, stats = synthesize(items, CallableTeacher(teacher, "stub"), [check, exact_dedup_filter()],
                                       k=3, seed=11, out_dir=tmp_path)
    assert stats == [{"filter": "verifier", "in": 18, "kept": 12},
                     {"filter": "exact_dedup", "in": 12, "kept": distinct}]
    assert len({r["input"] for r in kept}) == len(kept) == distinct           # one per distinct question
    assert [r["id"] for r in read_records(tmp_path / "kept.jsonl")] == [r["id"] for r in kept]
    by_id = {it["id"]: it for it in items}
    for r in kept:
        it = by_id[r["prompt_id"]]
        assert r["id"] == f"{it['id']}-s0" and r["teacher"] == "stub"
        assert r["prompt"] == it["prompt"] and r["attributes"] == it["attributes"] and r["demos"] == it["demos"]
        assert r["seed"] == {"prompts": 3, "generation": 11} and r["sample"] == 0
        assert r["filters_passed"] == ["verifier", "exact_dedup"] and r["scores"] == {"verifier": 1.0}
    by_filter = Counter(r["rejected_by"] for r in read_records(tmp_path / "rejected.jsonl"))
    assert by_filter == {"verifier": 6, "exact_dedup": 12 - distinct}
    report = dataset_report(kept, score="verifier")
    assert report["count"] == distinct and report["pass_rate"] == 1.0 and 0 < report["distinct-2"] <= 1
    assert pass_rate(rejected, "verifier") == pytest.approx((12 - distinct) / (18 - distinct))
    assert not list(tmp_path.glob(".*.tmp-*"))                  # atomic writes leave no temporary file


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="must return 2 strings"):
        generate([{"id": "p", "task": "t", "prompt": "x", "input": None, "attributes": {}, "demos": [], "seed": 0}],
                 lambda ps: ["only one"], k=2)
    with pytest.raises(ValueError, match="lacks the provenance fields"):
        write_records("/tmp/never.jsonl", [{"id": "x", "output": "y"}])
    with pytest.raises(ValueError, match="unique"):
        apply_filters([], [Filter("f", lambda r: ([], None)), Filter("f", lambda r: ([], None))])
    with pytest.raises(ValueError, match="returned 0 decisions for 1"):
        apply_filters([{"id": "x", "output": "y"}], [Filter("bad", lambda r: ([], None))])
    with pytest.raises(ValueError, match="uses \\{input\\} but no input"):
        build_prompts(SPEC, GRID, 1, seed=0)


def test_read_records_rejects_a_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ValueError, match="r.jsonl:1: record lacks"):
        read_records(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"{a} + {b} = {a + b} Answer: {a + b} Attributes level" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    return Tokenizer.train(d / "t.txt", vocab_size=300, split_digits=True)


def test_lm_teacher_batched_sampling_seeded_and_stop(tok):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    items = build_prompts(SPEC, GRID, 3, seed=0, input_fn=_pick_question)
    teacher = LMTeacher(model, tok, temperature=1.0, max_new_tokens=6, name="tiny")
    a, b = generate(items, teacher, k=2, seed=4), generate(items, teacher, k=2, seed=4)
    assert [r["output"] for r in a] == [r["output"] for r in b] and len(a) == 6
    assert a[0]["teacher"] == "tiny" and a[3]["prompt_id"] == items[1]["id"] and a[3]["sample"] == 1
    assert LMTeacher(model, tok, stop_pattern=r"Answer: \d+").cut("1 + 1 = 2\nAnswer: 2junk") == "1 + 1 = 2\nAnswer: 2"
    kept, rejected, _ = apply_filters(a, [judge_filter(DirectScorer(model, tok), top_fraction=0.5)])   # d-RLAIF judge
    assert len(kept) >= 3 and all(-1.0 <= r["scores"]["judge"] <= 1.0 for r in kept + rejected)
    assert min(r["scores"]["judge"] for r in kept) > max(r["scores"]["judge"] for r in rejected)
    greedy = LMTeacher(model, tok, temperature=0.0, max_new_tokens=6)
    assert greedy([items[0]["prompt"]]) == greedy([items[0]["prompt"]])
    with pytest.raises(ValueError, match="use k=1"):
        greedy([items[0]["prompt"]], k=2)


def test_quick_example(load_example, tmp_path):
    example = load_example("synth")
    results = example.main(["--quick", "--out", str(tmp_path), "--cache", "", "--arms", *example.ARMS])
    assert (tmp_path / "results.json").is_file()
    r = results[0]
    kept = read_records(tmp_path / "seed0" / "kept.jsonl")
    rejected = read_records(tmp_path / "seed0" / "rejected.jsonl")
    assert len(kept) == r["data/filtered: count"] and len(kept) + len(rejected) == r["data/generated"]
    assert all(rec["filters_passed"] == ["verifier", "exact_dedup", "near_dedup"] for rec in kept)
    assert all(example.steps_ok(_problem(rec["input"]), rec["output"]) for rec in kept)
    assert example.steps_ok(_problem("2 + 3 = ?"), " 2 + 3 = 5\nAnswer: 5\n")
    assert not example.steps_ok(_problem("2 + 3 = ?"), "1 + 4 = 5\nAnswer: 5")   # right answer, wrong steps
    have = lambda name: r[f"data/{name}: count"] > 0
    arms = ({"gold", "unfiltered"} | ({"filtered", "filtered + re-weighted"} if kept else set())
            | {a for a in ("filtered (answer only)", "self-consistency") if have(a)})
    assert {k.split(": ")[1] for k in r if k.startswith("accuracy/student") and "level" not in k} == arms
    assert all(0.0 <= r[f"accuracy/student: {a}"] <= 1.0 for a in arms)
