"""Tests for elleci.algos.merging.tli (spec algos_merge_data.md §3.3 oracles) and the examples/tli.py smoke run."""
import json
import math

import pytest
import torch

from elleci.algos.merging import tli
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.lora import LoraConfig, apply_lora, lora_modules
from elleci.tasks.lexicon import PAIRS, TRAIN_PAIRS, random_pairs

WORDS = PAIRS[:40]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"In inglese {it} si dice {en}. In Italian {en} is {it}." for it, en in WORDS]
    (d / "t.txt").write_text("\n".join(lines * 3))
    return Tokenizer.train(d / "t.txt", vocab_size=400)


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()   # 4 layers, "MA"


# ----------------------------------------------------------------------------- pooling (oracles 1, 2)

def test_pooling_is_invariant_to_padding(tok):
    model = _model(tok)
    ids = tok.encode(" farfalla")
    assert 1 < len(ids) <= 4
    layers = range(5)
    with torch.no_grad():
        short = tli.pooled_states(model, *tli.pad_right([ids], tok.pad_id, 4), layers)
        long = tli.pooled_states(model, *tli.pad_right([ids], tok.pad_id, 12), layers)
        alone = tli.pooled_states(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), layers)
    for l in layers:    # equal up to fp32 rounding (the Mamba scan's chunk shape follows the length)
        torch.testing.assert_close(short[l], long[l], atol=1e-6, rtol=0)
        torch.testing.assert_close(short[l], alone[l], atol=1e-6, rtol=0)
    # a batch of words of different lengths gives each word its own vector
    batch = tli.word_embeddings(model, tok, ["cane", "farfalla", "elefante"], 2)
    one = torch.cat([tli.word_embeddings(model, tok, [w], 2) for w in ["cane", "farfalla", "elefante"]])
    torch.testing.assert_close(batch, one, atol=1e-6, rtol=0)


def test_identical_strings_have_cosine_one_and_vectors_unit_norm(tok):
    model = _model(tok)
    vecs = tli.word_embeddings_by_layer(model, tok, ["cane", "dog", "cane"])
    assert sorted(vecs) == [0, 1, 2, 3, 4]
    for v in vecs.values():
        assert v.shape == (3, 64)
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(v[0], v[2], rtol=0, atol=1e-6)   # two batch rows: no bitwise guarantee
        assert abs(float(v[0] @ v[2]) - 1.0) < 1e-6
    row = tli.alignment(model, tok, [("cane", "cane"), ("gatto", "gatto")], 3)
    assert abs(row["pair_cos"] - 1.0) < 1e-6 and row["p_at_1"] == 1.0


def test_final_layer_is_the_final_normed_hidden_states(tok):
    model = _model(tok)
    ids = torch.tensor([tok.encode(" cane")])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.hidden_states(ids).mean(1), dim=-1)
        got = tli.pooled_states(model, ids, torch.ones_like(ids, dtype=torch.bool), [4])[4]
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- LoRA (oracles 3, 4)

def test_at_lora_init_alignment_equals_the_base_exactly(tok):
    model = _model(tok)
    before = tli.alignment_by_layer(model, tok, WORDS)
    tli.early_layer_lora(model, 2)
    assert before == tli.alignment_by_layer(model, tok, WORDS)
    assert {int(n.split(".")[1]) for n in lora_modules(model)} == {0, 1}                # blocks < layer only
    assert {n.rsplit(".", 1)[1] for n in lora_modules(model)} == {"in_proj", "w_q", "w_kv_up"}
    assert all(m.r == 16 and m.scaling == 2.0 for m in lora_modules(model).values())


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_gradient_locality(tok, layer):
    model = _model(tok)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ran = set()
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: ran.add(i))
    items = list(zip(tli.encode_words(tok, ["cane", "gatto", "casa"]), tli.encode_words(tok, ["dog", "cat", "house"])))
    batch = tli.tli_collate(tok.pad_id)(items)
    loss, _ = tli.tli_step(layer)(model, batch)
    loss.backward()
    assert ran == set(range(layer))                                  # blocks >= layer never ran
    for name, m in lora_modules(model).items():
        block = int(name.split(".")[1])
        grads = [p.grad for p in (m.lora_A, m.lora_B)]
        if block >= layer:
            assert all(g is None or not g.any() for g in grads), name
        else:
            assert all(g is not None for g in grads), name
    assert any(lora_modules(model)[f"blocks.{layer - 1}.{s}"].lora_B.grad.any()
               for s in ("attn.in_proj", "attn.w_q") if f"blocks.{layer - 1}.{s}" in lora_modules(model))


# ----------------------------------------------------------------------------- metrics and arithmetic (oracle 5)

def test_relative_change_reproduces_the_paper():
    # the four means are rounded to 4 decimals, so the ratio is known to about ±0.03 percentage points
    assert abs(100 * tli.relative_change(0.3211, 0.4113) - 28.08) < 0.02
    assert abs(100 * tli.relative_change(0.3143, 0.4033) - 28.32) < 0.02
    assert tli.relative_change(0.5, 0.25) == -0.5
    with pytest.raises(ValueError, match="from 0"):
        tli.relative_change(0.0, 1.0)


def test_alignment_metrics_hand_cases():
    eye = torch.eye(5)
    assert tli.alignment_metrics(eye, eye) == {"pair_cos": 1.0, "random_cos": 0.0, "gap": 1.0, "p_at_1": 1.0}
    swapped = tli.alignment_metrics(eye, eye[[1, 0, 2, 3, 4]])        # two words retrieve the wrong one
    assert swapped["pair_cos"] == pytest.approx(0.6) and swapped["p_at_1"] == pytest.approx(0.6)


def test_derangement_is_the_lexicons_random_pairs():
    for n, seed in [(2, 0), (7, 3), (len(TRAIN_PAIRS), 1)]:
        sigma = tli.derangement(n, seed)
        assert all(sigma[i] != i for i in range(n)) and sorted(sigma) == list(range(n))
        pairs = TRAIN_PAIRS[:n]
        assert random_pairs(pairs, seed) == tuple((pairs[i][0], pairs[sigma[i]][1]) for i in range(n))


# ----------------------------------------------------------------------------- losses

def test_infonce_on_a_perfectly_aligned_orthogonal_batch():
    for B, tau in [(2, 1.0), (4, 0.1), (8, 0.5)]:
        x = torch.eye(B, 16, dtype=torch.float64)
        loss, m = tli.infonce_loss(x, 3 * x, temperature=tau)          # scale does not matter (cosines)
        assert loss.item() == pytest.approx(math.log(1 + (B - 1) * math.exp(-1 / tau)), rel=1e-5)
        assert m["cos/pair"] == 1 and m["cos/negative"] == 0 and m["accuracy"] == 1


def test_infonce_hand_case_and_symmetry():
    it = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    en = torch.tensor([[1.0, 0.0], [1.0, 1.0]])                       # S = [[1, 1/√2], [0, 1/√2]]
    s = 1 / math.sqrt(2)
    rows = -math.log(math.e / (math.e + math.exp(s))) - math.log(math.exp(s) / (1 + math.exp(s)))
    cols = -math.log(math.e / (math.e + 1)) - math.log(math.exp(s) / (math.exp(s) + math.exp(s)))
    loss, _ = tli.infonce_loss(it, en, temperature=1.0)
    assert loss.item() == pytest.approx((rows + cols) / 4, rel=1e-6)
    assert tli.infonce_loss(en, it, temperature=1.0)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_triplet_loss_hand_cases():
    x = torch.eye(3)
    assert tli.triplet_loss(x, x, margin=0.5)[0].item() == 0.0        # margin satisfied: 1 − 0 ≥ 0.5
    assert tli.triplet_loss(x, x, margin=1.5)[0].item() == pytest.approx(0.5)    # 1.5 − 1 + 0 each
    it = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    en = torch.tensor([[1.0, 0.0], [1.0, 0.0]])                       # S = [[1, 1], [0, 0]]
    # it-anchors: (0.1 − 1 + 1)=0.1, (0.1 − 0 + 0)=0.1; en-anchors: (0.1 − 1 + 0)→0, (0.1 − 0 + 1)=1.1
    assert tli.triplet_loss(it, en, margin=0.1)[0].item() == pytest.approx(0.5 * (0.2 + 1.1) / 2)


def test_tli_loss_dispatch_and_errors():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(tli.tli_loss(a, b, kind="triplet", margin=0.3)[0], tli.triplet_loss(a, b, margin=0.3)[0])
    assert torch.equal(tli.tli_loss(a, b, temperature=0.2)[0], tli.infonce_loss(a, b, temperature=0.2)[0])
    with pytest.raises(ValueError, match="unknown TLI loss kind"):
        tli.tli_loss(a, b, kind="mse")
    with pytest.raises(ValueError, match="at least 2"):
        tli.infonce_loss(a[:1], b[:1])
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        tli.infonce_loss(a, b[:3])
    with pytest.raises(ValueError, match="temperature"):
        tli.infonce_loss(a, b, temperature=0.0)


def test_errors_name_the_problem(tok):
    model = _model(tok)
    with pytest.raises(ValueError, match="word list is empty"):
        tli.word_embeddings(model, tok, [], 1)
    with pytest.raises(ValueError, match="layer 5 out of range.*0 .* to 4"):
        tli.word_embeddings(model, tok, ["cane"], 5)
    with pytest.raises(ValueError, match="token embeddings"):
        tli.early_layer_lora(model, 0)
    with pytest.raises(ValueError, match="early_layer_lora"):
        for p in model.parameters():
            p.requires_grad_(False)
        tli.train_tli(model, tok, WORDS, layer=2, steps=1)
    with pytest.raises(ValueError, match="at least 2"):
        tli.alignment(model, tok, WORDS[:1], 1)


# ----------------------------------------------------------------------------- training

def test_short_training_raises_the_training_pair_cosine(tok):
    model = _model(tok)
    train, layer = WORDS[:32], 2
    before = tli.alignment(model, tok, train, layer)
    tli.early_layer_lora(model, layer, dropout=0.0)
    history = tli.train_tli(model, tok, train, layer=layer, steps=12, lr=2e-2, batch_size=16, log_every=100,
                            print_fn=None)
    after = tli.alignment(model, tok, train, layer)
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["pair_cos"] > before["pair_cos"] + 0.3          # seeds 0-3: 0.08-0.18 -> 0.70-0.72
    assert after["gap"] > before["gap"] + 0.3 and after["p_at_1"] >= 0.75
    assert not model.training


# ----------------------------------------------------------------------------- the example


def test_example_quick_runs(load_example, tmp_path, capsys):
    result = load_example("tli").main(["--quick", "--out", str(tmp_path), "--cache", ""])
    out = capsys.readouterr().out
    assert "| layer |" in out and "translation cos" in out and "control" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][0]["layer"] == result[0]["layer"]
    for when in ("before", "after"):
        for key in ("target/train", "target/control", "final/train", "final/control"):
            assert set(result[0][when][key]) == {"pair_cos", "random_cos", "gap", "p_at_1"}
