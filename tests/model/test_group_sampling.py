"""One prefill per prompt group (`num_return_sequences=G`): the same tokens as G separate prefills under the
same seed, greedy and sampled, with the dynamic cache, the static decoder and `sample_responses`."""
import pytest
import torch

from elleci.algos.sampling import sample_responses
from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.model.decode import generate_static
from elleci.model.generation import generate

PATTERNS = {"MA": dict(layer_pattern="MA"),
            "MMMA+gates": dict(layer_pattern="MMMA", mamba_input_gate=True, mla_latent_gate=True)}
SAMPLED = dict(temperature=1.0, top_k=50, top_p=0.9)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", **kw)).double().eval()


def prompts(lengths=(3, 11, 1, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in lengths]


def run(fn, model, ps, G, share, seed=None, **kw):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return fn(model, ps, 10, num_return_sequences=G, share_prefill=share, generator=gen, **kw)


@pytest.mark.parametrize("name", PATTERNS)
def test_shared_prefill_gives_the_tokens_of_separate_prefills(name):
    model, ps, G = tiny(**PATTERNS[name]), prompts(), 3
    greedy = run(generate, model, ps, G, True, temperature=0.0)
    assert torch.equal(greedy, run(generate, model, ps, G, False, temperature=0.0))
    assert torch.equal(greedy[::G], generate(model, ps, 10, temperature=0.0))          # G = 1 is plain generate
    shared = run(generate, model, ps, G, True, seed=7, **SAMPLED)
    assert torch.equal(shared, run(generate, model, ps, G, False, seed=7, **SAMPLED))
    # the old way of asking for groups: every prompt repeated G times in the input
    repeated = [p for p in ps for _ in range(G)]
    assert torch.equal(shared, generate(model, repeated, 10, generator=torch.Generator().manual_seed(7), **SAMPLED))
    assert shared.shape[0] == len(ps) * G and not torch.equal(shared[0], shared[1])    # the G rows differ


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("mode", ["kv", "latent"])
def test_static_decoder_shares_the_prefill_too(name, mode):
    model, ps, G = tiny(1, **PATTERNS[name]), prompts(seed=2), 4
    eos = [5, 9, 11]
    want = run(generate, model, ps, G, False, seed=3, eos_token_id=eos, **SAMPLED)
    got = run(generate_static, model, ps, G, True, seed=3, eos_token_id=eos, kv_mode=mode, **SAMPLED)
    assert torch.equal(got, want)
    assert torch.equal(run(generate_static, model, ps, G, True, temperature=0.0, kv_mode=mode),
                       run(generate, model, ps, G, True, temperature=0.0))


def test_select_rows_clones_and_drops_cache_rows():
    model = tiny()
    cache = model.new_cache(2)
    model.hidden_states(torch.randint(4, 512, (2, 5)), cache=cache)
    before = [t.clone() for layer in cache.layers for t in vars(layer).values()]
    cache.select_rows(torch.tensor([1, 1, 0]))
    after = [t for layer in cache.layers for t in vars(layer).values()]
    assert cache.mask.shape == (3, 5)
    for b, a in zip(before, after):
        assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[0])


def test_num_return_sequences_bad_input_raises():
    model = tiny()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_return_sequences"):
            generate(model, [[5, 6]], 2, num_return_sequences=bad)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "t.txt").write_text("\n".join(f"{a} + {b} = {a + b} Answer: {a + b} yes no Response 1 2"
                                      for a in range(10) for b in range(10)))
    return Tokenizer.train(d / "t.txt", vocab_size=300, split_digits=True)


def test_sample_responses_same_texts_with_and_without_sharing(tok):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).double().eval()
    ps = ["1 + 2 = ?", "3 + 3 = ?", "9 + 9 = ?"]
    kw = dict(k=3, max_new_tokens=8, seed=5, batch_size=6)          # 2 prompts a batch: the groups span batches
    shared = sample_responses(model, tok, ps, share_prefill=True, **kw)
    assert shared == sample_responses(model, tok, ps, share_prefill=False, **kw)
    assert len(shared) == 3 and all(len(g) == 3 for g in shared) and len(set(shared[0])) > 1
