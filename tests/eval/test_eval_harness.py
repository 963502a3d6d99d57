"""The lm-eval bridge: each request type against elleci's own computations, in float64."""
import math

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from elleci.algos import sequence_logprobs  # noqa: E402
from elleci.eval.harness import ElleciEvalLM  # noqa: E402
from elleci.eval.scoring import rolling_windows  # noqa: E402


def _inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _seq_logp(model, ctx, cont) -> float:
    """elleci's sequence_logprobs of `cont` after `ctx`, one sequence alone."""
    ids = torch.tensor([list(ctx) + list(cont)])
    labels = ids.clone()
    labels[0, :len(ctx)] = -100
    with torch.no_grad():
        return float(sequence_logprobs(model, ids, labels)[0])


def _greedy(model, ctx, cont) -> bool:
    """Every continuation token is the argmax of the full float64 logits (the naive oracle)."""
    ids = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        pred = model(ids)[0, len(ctx) - 1:-1].argmax(-1)
    return pred.tolist() == list(cont)


PAIRS = [("Tre più quattro fa", " sette."), ("Il cielo è ", "azzurro"), ("", "Dopo lunedì viene martedì."),
         ("Domanda: Qual è la capitale d'Italia?\nRisposta:", " Roma"), ("A", " b c d e f g h"),
         ("Il gatto dorme sul divano e la neve è bianca.", " Città"), ("Uno", " due tre")]


def test_loglikelihood_equals_sequence_logprobs(model, tok):
    lm = ElleciEvalLM(model=model, tokenizer=tok, batch_size=3)
    out = lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(PAIRS)])
    assert len(out) == len(PAIRS)
    for (context, continuation), (logp, greedy) in zip(PAIRS, out):
        if context == "":
            ctx, cont = [tok.eos_id], tok.encode(continuation)
        else:
            n = len(context) - len(context.rstrip())                 # trailing spaces go to the continuation
            whole = tok.encode(context + continuation)
            ctx = tok.encode(context[:len(context) - n])
            cont = whole[len(ctx):]
        assert isinstance(logp, float) and logp < 0
        assert abs(logp - _seq_logp(model, ctx, cont)) < 1e-9
        assert greedy == _greedy(model, ctx, cont)


def test_is_greedy_true_for_the_models_own_greedy_continuation(model, tok):
    ctx = tok.encode("Tre più quattro fa")
    cont = model.generate([ctx], 5, temperature=0.0)[0, len(ctx):].tolist()
    lm = ElleciEvalLM(model=model, tokenizer=tok)
    (logp, greedy), = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert greedy and abs(logp - _seq_logp(model, ctx, cont)) < 1e-9


def test_context_longer_than_max_length_is_cut_from_the_left(model, tok):
    ctx, cont = tok.encode("Il gatto dorme sul divano e la neve è bianca. Tre più"), tok.encode(" quattro")
    lm = ElleciEvalLM(model=model, tokenizer=tok, max_length=6)
    (logp, _), = lm._loglikelihood_tokens([(None, ctx, cont)])
    kept = (ctx + cont)[-7:]                                        # max_length + 1 tokens, the last one only scored
    assert abs(logp - _seq_logp(model, kept[:len(kept) - len(cont)], cont)) < 1e-9
    assert abs(logp - _seq_logp(model, ctx, cont)) > 1e-6           # the cut changed the context


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 8])
def test_rolling_windows_are_lm_evals(max_length):
    for n in range(0, 30):
        tokens = list(range(10, 10 + n))
        ours = list(rolling_windows(tokens, 0, max_length))
        theirs = list(map(make_disjoint_window, get_rolling_token_windows(tokens, 0, max_length, 1)))
        assert ours == [tuple(w) for w in theirs]
        assert [t for _, cont in ours for t in cont] == tokens      # every token predicted exactly once


def test_loglikelihood_rolling_equals_the_sum_over_the_harness_windows(model, tok):
    docs = ["Tre più quattro fa sette. Dopo lunedì viene martedì. Il cielo è azzurro. L'erba è verde.",
            "Il cielo.", "Uno due tre quattro cinque sei sette otto nove dieci undici dodici."]
    lm = ElleciEvalLM(model=model, tokenizer=tok, max_length=8, batch_size=4)
    out = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (d,), i) for i, d in enumerate(docs)])
    for doc, total in zip(docs, out):
        tokens = tok.encode(doc)
        windows = list(map(make_disjoint_window, get_rolling_token_windows(tokens, tok.eos_id, 8, 1)))
        expected = sum(_seq_logp(model, ctx, cont) for ctx, cont in windows)
        assert abs(total - expected) < 1e-9
    long_tokens = tok.encode(docs[0])
    assert len(long_tokens) > 3 * 8                                 # several windows...
    whole = _seq_logp(model, [tok.eos_id], long_tokens)
    assert abs(out[0] - whole) > 1e-6                               # ...and they matter (context is cut)
    short = tok.encode(docs[1])
    assert len(short) <= 8 and abs(out[1] - _seq_logp(model, [tok.eos_id], short)) < 1e-9


def _alone(model, tok, prompt_ids, n):
    """Unbatched greedy text of n new tokens (no stop strings), up to the first EOS / <|im_end|>."""
    row = model.generate([prompt_ids], n, temperature=0.0)[0, len(prompt_ids):].tolist()
    cut = next((i for i, t in enumerate(row) if t in (tok.eos_id, tok.im_end_id)), len(row))
    return tok.decode(row[:cut])


def test_generate_until_stops_each_sequence_at_its_own_first_stop_string(model, tok):
    prompts = ["Tre più quattro fa", "Il", "Dopo lunedì viene martedì. Il cielo è"]
    n = 24
    full = [_alone(model, tok, tok.encode(p), n) for p in prompts]
    assert all(len(t) > 12 for t in full)
    until = [[full[0][6:8], "§never§"], ["§never§"], [full[2][9:12]]]   # stop strings that do occur, and one that never does
    lm = ElleciEvalLM(model=model, tokenizer=tok, batch_size=3)
    reqs = [_inst("generate_until", (p, {"until": u, "max_gen_toks": n, "do_sample": False}), i)
            for i, (p, u) in enumerate(zip(prompts, until))]
    out = lm.generate_until(reqs)
    for text, ref, u in zip(out, full, until):
        cut = min((ref.index(s) for s in u if s in ref), default=len(ref))
        assert text == ref[:cut]                                    # = unbatched greedy, cut at the first stop
        assert not any(s in text for s in u)
    assert len(out[0]) <= 6 and len(out[2]) <= 9 and out[1] == full[1]


def test_generation_stops_once_every_row_hit_a_stop_string(model, tok):
    from elleci.eval.generate import StopStrings, stop_token_ids
    ids = [tok.encode("Tre più quattro fa"), tok.encode("Il")]
    full = [_alone(model, tok, p, 30) for p in ids]
    stop = StopStrings(tok, [[full[0][:3]], [full[1][:3]]], stop_token_ids(tok))
    out = model.generate(ids, 30, temperature=0.0, eos_token_id=stop_token_ids(tok), stop_fn=stop)
    assert out.shape[1] - max(map(len, ids)) < 30 and stop.stopped == [True, True]


def test_sampling_settings_are_seeded_and_grouped(model, tok):
    lm = ElleciEvalLM(model=model, tokenizer=tok, seed=7)
    args = ("Il cielo è", {"until": ["§"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})
    a, b = lm.generate_until([_inst("generate_until", args)]), lm.generate_until([_inst("generate_until", args)])
    assert a == b                                                   # same seed, same draw
    greedy = lm.generate_until([_inst("generate_until", ("Il cielo è", {"until": ["§"], "max_gen_toks": 8}))])
    assert greedy[0] == _alone(model, tok, tok.encode("Il cielo è"), 8)


def test_chat_template_is_elleci_chatml(model, tok):
    lm = ElleciEvalLM(model=model, tokenizer=tok)
    text = lm.apply_chat_template([{"role": "user", "content": "Ciao"}])
    assert text == "<|im_start|>user\nCiao<|im_end|>\n<|im_start|>assistant\n"
    assert lm.chat_template(False) is None and "<|im_start|>" in lm.chat_template(True)
    assert lm.tokenizer_name == f"elleci-sentencepiece-{tok.vocab_size}"


def test_model_args_load_a_saved_model_with_adapter(tmp_path, tok, make_model):
    from lm_eval.api.registry import get_model
    from elleci.model.lora import LoraConfig, apply_lora, save_adapter

    base = make_model(tok, seed=3)
    base.save_pretrained(tmp_path / "base", tokenizer=tok)
    adapted = make_model(tok, seed=3)
    apply_lora(adapted, LoraConfig(r=4, lora_alpha=8, target_modules=["attn.in_proj", "attn.out_proj"]))
    torch.manual_seed(1)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)                                  # a non-zero adapter
    save_adapter(adapted, tmp_path / "adapter")
    cls = get_model("elleci")
    assert cls is ElleciEvalLM and get_model("dummy").__name__ == "DummyLM"   # lm-eval's own models still there
    lm = cls.create_from_arg_string(f"path={tmp_path / 'base'},adapter={tmp_path / 'adapter'},dtype=float64,"
                                    "batch_size=4", {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert lm.batch_size == 4 and lm.info["adapter"] == str(tmp_path / "adapter")
    (logp, _), = lm.loglikelihood([_inst("loglikelihood", ("Tre più quattro fa", " sette."))])
    ctx, cont = tok.encode("Tre più quattro fa"), tok.encode("Tre più quattro fa sette.")[len(tok.encode("Tre più quattro fa")):]
    assert abs(logp - _seq_logp(adapted.eval(), ctx, cont)) < 1e-9
    assert abs(logp - _seq_logp(base, ctx, cont)) > 1e-6            # the adapter is on


def test_bad_arguments_are_refused(model, tok):
    with pytest.raises(ValueError, match="exactly one of"):
        ElleciEvalLM()
    with pytest.raises(ValueError, match="no automatic batch size"):
        ElleciEvalLM(model=model, tokenizer=tok, batch_size="auto")
    with pytest.raises(ValueError, match="dtype"):
        ElleciEvalLM(model=model, tokenizer=tok, dtype="float8")
    with pytest.raises(ValueError, match="max_gen_toks=10 leaves no room"):
        ElleciEvalLM(model=model, tokenizer=tok, max_length=10).generate_until(
            [_inst("generate_until", ("Il", {"until": [], "max_gen_toks": 10}))])
    assert math.isfinite(ElleciEvalLM(model=model, tokenizer=tok).loglikelihood(
        [_inst("loglikelihood", ("Il", " gatto"))])[0][0])
