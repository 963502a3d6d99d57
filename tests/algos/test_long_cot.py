"""Long CoT: the think/answer SFT format (prompt masked), budget forcing (spec §7.7 oracle 4) on toy
generators, and the model generator against `ElleciLM.generate`."""
import pytest
import torch

from elleci.algos.reasoning.long_cot import (ANSWER, THINK, BudgetTokens, answer_section, arithmetic_trace, budget_forcing,
                                   long_cot_examples, long_cot_response, model_generator, parse_long_cot, stepwise)
from elleci.algos.sampling import prompt_ids
from elleci.algos.sft import encode_sft
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.tokenizer import render_chat
from elleci.tasks import arithmetic


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    texts = [long_cot_response(arithmetic_trace(p), p.answer) for p in arithmetic.make_problems(300, seed=0)]
    path.write_text("\n".join(t.replace("\n", " ") for t in texts + ["Wait Final Answer:"] * 20), encoding="utf-8")
    return Tokenizer.train(path, vocab_size=300, split_digits=True)


# ----------------------------------------------------------------------------- the format

def test_long_cot_response_is_the_s1_format():
    p = arithmetic.make_problem([4, 7, 3], ["+", "-"], 3)
    assert arithmetic_trace(p) == "4 + 7 = 11\n11 - 3 = 8"
    text = long_cot_response(arithmetic_trace(p), p.answer)
    assert text == "<|im_start|>think\n4 + 7 = 11\n11 - 3 = 8\n<|im_start|>answer\nAnswer: 8"
    assert parse_long_cot(text) == ("4 + 7 = 11\n11 - 3 = 8", "Answer: 8")
    assert answer_section(text) == "\nAnswer: 8" and answer_section("no delimiter") == "no delimiter"
    conv = long_cot_examples([p])[0]
    assert conv == [{"role": "user", "content": "4 + 7 - 3 = ?"}, {"role": "assistant", "content": text}]
    with pytest.raises(ValueError, match="empty"):
        long_cot_response("  ", 3)


@pytest.mark.parametrize("bad", [
    "<|im_start|>think\n\n<|im_start|>answer\nAnswer: 8",                    # empty thinking
    "<|im_start|>think\n1 + 2 = 3\nAnswer: 3",                               # no answer delimiter
    "think\n1 + 2 = 3\n<|im_start|>answer\nAnswer: 3",                        # no think delimiter
    "<|im_start|>think\n1 + 2 = 3\n<|im_start|>answer\nAnswer: 3\nmore",     # trailing text
    "<|im_start|>think\n1 + 2 = 3\n<|im_start|>answer\nIt is 3",             # no "Answer:" line
    "<|im_start|>think\n1 + 2 = 3\n<|im_start|>answer\nAnswer: 3\n<|im_start|>answer\nAnswer: 4",  # two answers
])
def test_parse_long_cot_rejects_broken_formats(bad):
    assert parse_long_cot(bad) is None


def test_sft_encoding_masks_the_prompt_and_starts_with_the_think_delimiter(tok):
    problems = arithmetic.make_problems(5, seed=1, levels=(1, 3))
    examples = encode_sft(tok, long_cot_examples(problems))
    think = tok.encode(THINK)
    for p, (ids, labels) in zip(problems, examples):
        prompt = tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True)
        n = len(prompt)
        assert ids[:n] == prompt and labels[:n] == [-100] * n                  # prompt masked, exactly
        assert labels[n:] == ids[n:] and ids[-1] == tok.im_end_id               # the whole response is scored
        assert ids[n:n + len(think)] == think                                   # what budget forcing appends
        assert tok.decode(ids[n:], skip_special_tokens=False) == (
            long_cot_response(arithmetic_trace(p), p.answer) + "<|im_end|>")
        assert tok.decode(ids, skip_special_tokens=False).startswith(render_chat([{"role": "user",
                                                                                   "content": p.question}]))
    assert tok.encode(ANSWER)[0] == tok.im_start_id and len(tok.encode("<|im_start|>")) == 1


# ----------------------------------------------------------------------------- budget forcing on toys

# toy vocabulary: 0 <|im_start|> (end of thinking), 1 "think", 2 "answer", 3 <|im_end|>, 4 "x", 5 "\n",
# 6 "Wait", 7 "Final Answer:", 8 "7", 9 prompt token
S, TH, AN, END, X, NL, W, FA, SEVEN, P = range(10)
TOYS = BudgetTokens(think=[S, TH], answer=[S, AN], final_answer=[NL, FA], newline=[NL], wait=[W],
                    think_stop=[S, END], answer_stop=[END])


def toy(think_len: int | None, token: int = X):
    """A scripted model: after "<|im_start|>think" or "Wait" it writes `think_len` tokens then <|im_start|>
    (never, when None); after <|im_start|> it writes "answer"; after the answer delimiter "7" then <|im_end|>."""
    def next_token(seq, banned):
        if seq[-1] == S:
            return AN
        if seq[-2:] == [S, AN]:
            return SEVEN
        if seq[-1] in (SEVEN, FA):
            return END if seq[-1] == SEVEN else SEVEN
        last = max(i for i, t in enumerate(seq) if t in (TH, W))
        n = len(seq) - 1 - last
        return token if think_len is None or n < think_len else S
    return stepwise(next_token)


@pytest.mark.parametrize("variant", ["harness", "readme"])
def test_oracle_ends_after_three_tokens_k2_gives_two_waits_nine_tokens(variant):
    [r] = budget_forcing(toy(3), [[P]], TOYS, budget=100, num_ignore=2, variant=variant)
    assert r.calls == 3 and r.waits == 2 and r.generated == 9
    assert r.thinking == [X, X, X, W, X, X, X, W, X, X, X]
    assert r.closing == [S, AN] and not r.hit_length                          # plain answer delimiter
    assert r.answer == [SEVEN] and r.response == [S, TH] + r.thinking + [S, AN, SEVEN]


def test_oracle_never_closing_is_capped_at_b_and_force_closed():
    [r] = budget_forcing(toy(None), [[P]], TOYS, budget=5, num_ignore=2)
    assert r.thinking == [X] * 5 and r.generated == 5 and r.calls == 1 and r.waits == 0 and r.hit_length
    assert r.closing == [NL, S, AN, NL, FA]                                 # "\n<|im_start|>answer\nFinal Answer:"
    assert r.answer == [SEVEN]
    [r] = budget_forcing(toy(None, token=NL), [[P]], TOYS, budget=5)        # thinking already ends with "\n"
    assert r.closing == [S, AN, NL, FA]
    [r] = budget_forcing(toy(None), [[P]], TOYS, budget=5, force=False)     # the plain cap: no forced answer
    assert r.closing == [] and r.answer == [] and r.response == [S, TH] + [X] * 5


def test_oracle_k0_with_the_delimiter_equals_unforced_decoding():
    gen = toy(3)
    [r] = budget_forcing(gen, [[P]], TOYS, budget=100, num_ignore=0, max_answer_tokens=10)
    [(unforced, stopped)] = gen([[P, S, TH]], 100, [END], 0)                  # one pass, stops at <|im_end|> only
    assert stopped and r.response == [S, TH] + unforced and r.calls == 1 and r.waits == 0


def test_harness_and_readme_budgets_differ():
    """B = 5, k = 2, a model that ends thinking after 3 tokens: the harness gives every call B and cuts to B
    (last call stopped: plain close); the README gives the second call the 2 tokens left, which it hits."""
    [h] = budget_forcing(toy(3), [[P]], TOYS, budget=5, num_ignore=2, variant="harness")
    assert h.calls == 3 and h.generated == 9 and h.thinking == [X, X, X, W, X] and h.closing == [S, AN]
    [r] = budget_forcing(toy(3), [[P]], TOYS, budget=5, num_ignore=2, variant="readme")
    assert r.calls == 2 and r.waits == 1 and r.generated == 5 and r.thinking == [X, X, X, W, X, X]
    assert r.hit_length and r.closing == [NL, S, AN, NL, FA]
    [r] = budget_forcing(toy(3), [[P]], TOYS, budget=3, num_ignore=2, variant="readme")   # B tokens = the cap
    assert r.calls == 1 and r.waits == 0 and r.hit_length and r.closing == [NL, S, AN, NL, FA]


def test_extension_calls_generate_at_least_one_token():
    """After "Wait" a rule that would close at once is held off for one token (min_new_tokens = 1)."""
    def next_token(seq, banned):
        if seq[-1] == W:                                  # would close at once
            return X if S in banned else S
        return {TH: X, X: S, S: AN}[seq[-1]]
    [r] = budget_forcing(stepwise(next_token), [[P]], TOYS, budget=10, num_ignore=1, max_answer_tokens=0)
    assert r.thinking == [X, W, X] and r.answer == []


def test_batch_rows_are_independent_and_bad_input_raises():
    rows = budget_forcing(toy(3), [[P], [P, P]], TOYS, budget=5, num_ignore=1, variant="readme")
    assert [r.generated for r in rows] == [5, 5] and all(r.thinking == [X, X, X, W, X, X] for r in rows)
    for kw in ({"budget": 0}, {"budget": 4, "num_ignore": -1}, {"budget": 4, "variant": "auto"}):
        with pytest.raises(ValueError):
            budget_forcing(toy(3), [[P]], TOYS, **kw)


# ----------------------------------------------------------------------------- with a model

def test_model_generator_matches_generate_and_honours_min_tokens(tok):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    prompts = prompt_ids(tok, ["1 + 2 = ?", "4 + 7 - 3 = ?"])
    gen = model_generator(model)
    outs = gen(prompts, 6, [tok.im_end_id], 0)
    for p, (new, stopped) in zip(prompts, outs):
        ref = model.generate([p], max_new_tokens=6, temperature=0.0, eos_token_id=tok.im_end_id)[0, len(p):].tolist()
        assert new == ref[: len(new)] and (stopped == (len(new) < len(ref)))
    first = [new[0] for new, _ in gen(prompts, 1, [], 0)]                     # the greedy first tokens
    for new, stopped in gen(prompts, 3, first, 1):                            # banned at step 0 only
        assert new and new[0] not in first
    forced = budget_forcing(gen, prompts, BudgetTokens.from_tokenizer(tok), budget=4, num_ignore=1)
    alone = [budget_forcing(gen, [p], BudgetTokens.from_tokenizer(tok), budget=4, num_ignore=1)[0] for p in prompts]
    assert [r.response for r in forced] == [r.response for r in alone]       # batching changes nothing
    assert all(len(r.thinking) <= 4 for r in forced)
