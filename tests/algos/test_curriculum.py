"""Tests for elleci.algos.curation.curriculum (Vision-Flan two-stage tuning, spec §5: its oracles), the instruction
tasks and response style of elleci.tasks.instructions, and examples/curriculum.py --quick."""
import collections
import copy
import json
import math

import pytest
import torch

from elleci.algos.curation.curriculum import (STAGE2_TASK, CurriculumConfig, StageConfig, allocate, cap_tasks,
                                     example_probabilities, mix, plan_stages, run_stages, split_stages,
                                     task_batches, task_probabilities)
from elleci.algos.sft import sft_collate, sft_step
from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora
from elleci.tasks import instructions as ins

same = list                      # a collate_fn that returns the drawn items themselves


def tagged(sizes: dict) -> dict:
    """{task: [(task, i), ...]}: items that name their task and index."""
    return {t: [(t, i) for i in range(m)] for t, m in sizes.items()}


def slot_counts(batch_fn, steps: int) -> collections.Counter:
    return collections.Counter(item for s in range(steps) for item in batch_fn(s))


# ----------------------------------------------------------------------------------------- Eq. 1

def test_task_probabilities_hand_cases():
    sizes = {"a": 1, "b": 4}
    assert task_probabilities(sizes, 1.0) == pytest.approx({"a": 0.2, "b": 0.8}, abs=1e-12)       # proportional
    assert task_probabilities(sizes, 2.0) == pytest.approx({"a": 1 / 3, "b": 2 / 3}, abs=1e-12)   # √1 : √4
    assert task_probabilities(sizes, 0.5) == pytest.approx({"a": 1 / 17, "b": 16 / 17}, abs=1e-12)  # 1 : 16
    assert task_probabilities(sizes, math.inf) == {"a": 0.5, "b": 0.5}                            # uniform
    assert task_probabilities(sizes, 1e12) == pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-9)       # T → ∞ limit
    assert task_probabilities({"a": 9, "b": 1, "c": 90}, 1) == pytest.approx({"a": .09, "b": .01, "c": .9}, abs=1e-12)
    assert task_probabilities({"x": 10**6, "y": 1}, 1) == pytest.approx({"x": 1 - 1e-6, "y": 1e-6}, rel=1e-9)


@pytest.mark.parametrize("sizes,temperature", [({"a": 1}, 0.0), ({"a": 1}, -1.0), ({"a": 1}, math.nan),
                                               ({}, 1.0), ({"a": 0}, 1.0), ({"a": 2.5}, 1.0)])
def test_task_probabilities_reject_bad_input(sizes, temperature):
    with pytest.raises(ValueError):
        task_probabilities(sizes, temperature)


def test_example_probabilities_at_t1_are_those_of_the_concatenation():
    sizes = {"a": 3, "b": 5, "c": 12}
    assert all(p == pytest.approx(1 / 20, abs=1e-15) for p in example_probabilities(sizes, 1.0).values())
    assert example_probabilities(sizes, math.inf) == pytest.approx({"a": 1 / 9, "b": 1 / 15, "c": 1 / 36})


def test_cap_tasks_counts_total_and_subsets():
    tasks = {t: list(range(n)) for t, n in {"a": 5, "b": 1500, "c": 1000, "d": 1001}.items()}
    capped = cap_tasks(tasks, 1000, seed=3)
    assert {t: len(v) for t, v in capped.items()} == {"a": 5, "b": 1000, "c": 1000, "d": 1000}
    assert sum(map(len, capped.values())) == sum(min(len(v), 1000) for v in tasks.values())       # spec oracle
    for t, kept in capped.items():
        assert kept == sorted(set(kept)) and set(kept) <= set(tasks[t])        # a subset, in the task's order
    assert cap_tasks(tasks, 1000, seed=3) == capped                                            # deterministic
    assert cap_tasks(tasks, 1000, seed=4)["b"] != capped["b"]
    assert cap_tasks(tasks, None) == tasks == cap_tasks(tasks, math.inf)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            cap_tasks(tasks, bad)
    with pytest.raises(ValueError, match="no examples"):
        cap_tasks({"a": []}, 10)


# ----------------------------------------------------------------------------------------- the sampler

@pytest.mark.parametrize("temperature", [1.0, 2.0, math.inf])
def test_empirical_task_frequencies_match_eq1(temperature):
    sizes = {"a": 10, "b": 40, "c": 150}
    counts = collections.Counter(t for t, _ in slot_counts(task_batches(tagged(sizes), 16, 0, same,
                                                                        temperature=temperature), 1000).elements())
    n, probs = sum(counts.values()), task_probabilities(sizes, temperature)
    for t, p in probs.items():                  # fixed seed: a deterministic draw, 5σ of a binomial
        assert abs(counts[t] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (t, counts[t] / n, p)


def test_no_cap_and_t1_draws_every_example_uniformly():
    """Spec: with cap = ∞ and T = 1 the sampler is a shuffled concatenation (every example 1/N per slot)."""
    tasks = cap_tasks(tagged({"a": 3, "b": 7, "c": 20}), math.inf)
    counts = slot_counts(task_batches(tasks, 8, 1, same, temperature=1.0), 2000)
    n, expected = 16000, 16000 / 30
    assert len(counts) == 30
    chi2 = sum((counts[x] - expected) ** 2 / expected for x in counts)    # df 29: mean 29, sd 7.6
    assert chi2 < 29 + 6 * math.sqrt(2 * 29), chi2
    skew = slot_counts(task_batches(tasks, 8, 1, same, temperature=math.inf), 2000)   # not uniform per example
    assert skew[("a", 0)] / n == pytest.approx(1 / 9, abs=0.01)
    assert skew[("c", 0)] / n == pytest.approx(1 / 60, abs=0.005)


def test_batches_are_deterministic_in_seed_and_step():
    tasks = tagged({"a": 30, "b": 50})
    f, g = task_batches(tasks, 8, 7, same), task_batches(tasks, 8, 7, same)
    assert [f(s) for s in range(5)] == [g(s) for s in range(5)] and f(3) == f(3)
    assert [f(s) for s in range(5)] != [task_batches(tasks, 8, 8, same)(s) for s in range(5)]
    assert f(0) != f(1)


def test_within_a_batch_a_task_is_drawn_without_replacement():
    f = task_batches(tagged({"a": 5}), 5, 0, same)
    assert all(sorted(f(s)) == tagged({"a": 5})["a"] for s in range(20))            # a permutation
    g = task_batches(tagged({"a": 5}), 7, 0, same)
    assert all(set(g(s)) == set(tagged({"a": 5})["a"]) for s in range(20))          # then a fresh pass


def test_max_per_task():
    tasks = tagged({"a": 100, "b": 2, "c": 30})
    f = task_batches(tasks, 6, 0, same, max_per_task=2)
    for s in range(50):
        assert collections.Counter(t for t, _ in f(s)) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="cannot be filled"):
        task_batches(tasks, 7, 0, same, max_per_task=2)


# ----------------------------------------------------------------------------------------- the stages' data

def test_split_stages_never_shares_a_prompt():
    tasks = ins.make_tasks(("copy", "count", "compare"), 300, seed=0)
    tasks["copy"] = tasks["copy"] + tasks["copy"][:50]                   # repeated prompts stay on one side
    s1, s2 = split_stages(tasks, 0.2, key=lambda ex: ex.prompt, salt="s")
    for t in tasks:
        p1, p2 = {ex.prompt for ex in s1[t]}, {ex.prompt for ex in s2[t]}
        assert not p1 & p2 and len(s1[t]) + len(s2[t]) == len(tasks[t])
        assert 0.1 < len(s2[t]) / len(tasks[t]) < 0.3
    assert split_stages(tasks, 0.2, key=lambda ex: ex.prompt, salt="s") == (s1, s2)
    with pytest.raises(ValueError):
        split_stages(tasks, 1.0, key=lambda ex: ex.prompt)


def test_allocate_and_mix_hand_cases():
    assert allocate({"a": 5, "b": 100, "c": 100}, 101) == {"a": 5, "b": 48, "c": 48}
    assert allocate({"a": 10, "b": 10}, 7) == {"a": 4, "b": 3}
    assert allocate({"a": 3, "b": 0}, 3) == {"a": 3, "b": 0}
    with pytest.raises(ValueError, match="cannot take"):
        allocate({"a": 3}, 4)
    pools = tagged({"a": 5, "b": 100, "c": 100})
    out = mix(pools, 101, seed=0)
    assert len(out) == 101 == len(set(out)) and collections.Counter(t for t, _ in out) == {"a": 5, "b": 48, "c": 48}
    assert mix(pools, 101, seed=0) == out != mix(pools, 101, seed=1)


def test_stage2_set_has_the_configured_size_and_no_stage1_prompt():
    tasks = ins.make_tasks(("add-1", "copy", "reverse", "count", "compare", "it-en"), 1250, seed=0)
    s1, pools = split_stages(tasks, 0.2, key=lambda ex: ex.prompt, salt="stage2/0")
    stage2 = mix(pools, 1000, seed=0)
    assert len(stage2) == 1000                                                       # spec oracle
    assert not {ex.prompt for ex in stage2} & {ex.prompt for v in s1.values() for ex in v}


def test_plan_orders_the_stages_and_keeps_their_data_apart():
    s1 = {t: [("s1", t, i) for i in range(m)] for t, m in {"a": 40, "b": 2000}.items()}
    s2 = [("s2", j) for j in range(30)]
    cfg = CurriculumConfig(StageConfig(7, 3e-3, 4), StageConfig(5, 1e-3, 6), cap=1000, seed=0)
    two = plan_stages(s1, s2, cfg, same, mode="two-stage")
    assert [(s.name, s.steps, s.lr) for s in two] == [("stage1", 7, 3e-3), ("stage2", 5, 1e-3)]
    seen1 = {x for s in range(200) for x in two[0].batch_fn(s)}
    seen2 = {x for s in range(200) for x in two[1].batch_fn(s)}
    assert all(x[0] == "s1" for x in seen1) and all(x[0] == "s2" for x in seen2)
    assert len({x for x in seen1 if x[1] == "b"}) <= 1000                            # the cap applies
    assert len(two[1].batch_fn(0)) == 6 and len(two[0].batch_fn(0)) == 4
    one = plan_stages(s1, s2, cfg, same, mode="one-stage")
    assert [(s.name, s.steps, s.lr) for s in one] == [("one-stage", 12, 3e-3)]
    mixed = [x for s in range(200) for x in one[0].batch_fn(s)]
    assert {x[0] for x in mixed} == {"s1", "s2"}
    share = sum(x[0] == "s2" for x in mixed) / len(mixed)             # D_2 is one task: p = 30 / (40+1000+30)
    assert share == pytest.approx(30 / 1070, abs=5 * math.sqrt(0.028 / len(mixed)))
    with pytest.raises(ValueError, match="reserved"):
        plan_stages({STAGE2_TASK: [1]}, s2, cfg, same)
    with pytest.raises(ValueError, match="mode"):
        plan_stages(s1, s2, cfg, same, mode="three-stage")
    with pytest.raises(ValueError, match="empty"):
        plan_stages(s1, [], cfg, same)


def test_stage2_starts_from_the_final_stage1_weights():
    """Spec oracle (checkpoint handoff): at step 0 of stage 2 the weights are stage 1's final ones."""
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=64))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8.0, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    seqs = lambda n: [(ids, [-100] * 3 + ids[3:]) for ids in torch.randint(3, 64, (n, 8), generator=gen).tolist()]
    s1, s2 = {"a": seqs(6), "b": seqs(4)}, seqs(5)
    cfg = CurriculumConfig(StageConfig(2, 1e-2, 2), StageConfig(1, 5e-3, 2), seed=0)
    alone = copy.deepcopy(model)
    run_stages(alone, plan_stages(s1, s2, cfg, sft_collate(0))[:1], sft_step, print_fn=None)
    snapshot = {}
    stage1, stage2 = plan_stages(s1, s2, cfg, sft_collate(0))

    def spy(step):
        if step == 0:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        return stage2.batch_fn(step)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history = run_stages(model, [stage1, type(stage2)("stage2", spy, stage2.steps, stage2.lr)], sft_step,
                         print_fn=None)
    assert list(history) == ["stage1", "stage2"]
    expected = alone.state_dict()
    assert all(torch.equal(snapshot[k], expected[k]) for k in expected)
    assert any(not torch.equal(snapshot[k], start[k]) for k in start)                 # stage 1 did train
    assert any(not torch.equal(model.state_dict()[k], snapshot[k]) for k in start)    # and so did stage 2


# ----------------------------------------------------------------------------------------- tasks and style

@pytest.mark.parametrize("text,ok", [
    ("Sure!\n3 + 5 = 8\nFinal answer: 8", True), ("Sure!\nFinal answer: dog", True),
    ("  Sure!  \n\nFinal answer: b e a \n", True), ("Final answer: dog", False), ("Sure!\ndog", False),
    ("Sure! Final answer: dog", False), ("Sure!\nFinal answer: 8\nso", False), ("Sure.\nFinal answer: 8", False),
    ("Sure!\nFinal answer: 8\nFinal answer: 8", False), ("Sure!\nFinal answer:", False), ("", False),
    ("sure!\nFinal answer: 8", False), ("Sure!\nfinal answer: 8", False)])
def test_follows_style_hand_cases(text, ok):
    assert ins.follows_style(text) is ok


def test_is_correct_reads_either_format():
    add = ins.Example("add-1", "3 + 5 = ?", "8", "3 + 5 = 8\nAnswer: 8", "3 + 5 = 8")
    assert ins.is_correct(add, "3 + 5 = 8\nAnswer: 8") and ins.is_correct(add, "Sure!\n3 + 5 = 8\nAnswer: 8")
    assert ins.is_correct(add, "Sure!\nFinal answer: 8") and not ins.is_correct(add, "Answer: 8\nFinal answer: 9")
    assert not ins.is_correct(add, "3 + 5 = 9\nAnswer: 9") and not ins.is_correct(add, "")
    qa = ins.Example("qa", "Passage: Anna lives in Milan.\nQuestion: Where does Anna live?", "Milan",
                     "Anna lives in Milan.", "Anna lives in Milan.")
    assert ins.is_correct(qa, "Anna lives in Milan.")
    assert ins.is_correct(qa, "Sure!\nAnna lives in Rome.\nFinal answer: milan")      # the final line decides
    assert not ins.is_correct(qa, "Anna lives in Rome.") and not ins.is_correct(qa, "Sure!\nFinal answer: Rome")
    word = ins.Example("it-en", "Translate to English: cane", "dog", "dog")
    assert ins.is_correct(word, "Dog.") and not ins.is_correct(word, "dogs") and not ins.is_correct(word, "Sure!\ndogs")
    assert ins.final_answer("Sure!\nFinal answer:  1 8 3 ") == "1 8 3" and ins.final_answer("Sure!\n1 8 3") is None


def test_every_task_styled_and_terse_responses_check_out():
    for name, examples in ins.make_tasks(ins.TASKS, 30, seed=2).items():
        assert examples and len({ex.prompt for ex in examples}) == len(examples), name
        for ex in examples:
            assert ins.follows_style(ins.styled(ex)) and ins.is_correct(ex, ins.styled(ex)), ex
            assert not ins.follows_style(ex.terse) and ins.is_correct(ex, ex.terse), ex
            assert ins.conversation(ex, style=True)[1]["content"] == ins.styled(ex)


def test_generated_answers_and_held_out_split():
    train, test = ins.make_tasks(ins.TASKS, 200, seed=0), ins.make_tasks(ins.TASKS, 50, seed=5, split="test")
    for name in ins.TASKS:
        assert not {e.prompt for e in train[name]} & {e.prompt for e in test[name]}, name
    for ex in train["reverse"]:
        assert ex.answer.split() == ex.prompt.removeprefix("Reverse: ").split()[::-1]
    for ex in train["copy"]:
        assert ex.answer == ex.prompt.removeprefix("Copy: ")
    for ex in train["count"]:
        assert int(ex.answer) == len(ex.prompt.removeprefix("How many words: ").split())
    for ex in train["compare"]:
        a, b = (int(w.strip("?")) for w in ex.prompt.split(": ")[1].split(" or "))
        assert int(ex.answer) == max(a, b) != min(a, b)
    assert len(ins.make_task("add-1", 500, seed=0)) == 81                            # the space is small
    assert ins.make_task("reverse", 20, seed=1) == ins.make_task("reverse", 20, seed=1)
    for bad in (dict(name="nope", n=3), dict(name="copy", n=-1), dict(name="copy", n=3, split="dev")):
        with pytest.raises(ValueError):
            ins.make_task(**bad)


def test_quick_example(load_example, tmp_path):
    runs = load_example("curriculum").main(["--quick", "--out", str(tmp_path), "--cache", ""])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["results"]) == len(runs) == 1
    per_task = runs[0]["per_task"]
    assert set(per_task) == {"stage 1 only", "one-stage", "two-stage"}
    for arm in per_task.values():
        assert set(arm) == set(ins.TASKS)
        assert all(0.0 <= r[m] <= 1.0 for r in arm.values() for m in ("accuracy", "adherence", "strict"))
