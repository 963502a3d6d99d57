"""Packed documents through the whole model (`seq_idx`): each document computed as if alone, in float64."""
import pytest
import torch

from elleci.kernels import scan
from elleci.kernels.dispatch import triton_available, use_backend
from elleci.kernels.scan_ref import ssm_scan_ref
from elleci.model import ElleciConfig, ElleciLM
from elleci.model import mamba2
from elleci.model.decode import StaticDecoder, decode_hidden
from elleci.model.documents import document_positions
from elleci.model.generation import left_pad
from elleci.model.mla import attention_mask

CONFIGS = {"MA": dict(layer_pattern="MA"),
           "MA+gates": dict(layer_pattern="MA", mamba_input_gate=True, mla_latent_gate=True),
           "MMMA": dict(layer_pattern="MMMA"),
           "MMMA+gates": dict(layer_pattern="MMMA", mamba_input_gate=True, mla_latent_gate=True)}
# per row, the lengths of its documents: a one-token document, documents shorter than the conv window
# (d_conv - 1 = 3), boundaries inside and at the edges of the scan's chunks (chunk_size 4 below)
ROWS = [[5, 1, 9, 2, 4], [4, 12, 5], [21]]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", chunk_size=4, **kw)).double().eval()


def pack(rows, seed=1, vocab=512):
    """(ids [R, L], seq_idx [R, L], docs: per row the list of (start, token tensor))."""
    g = torch.Generator().manual_seed(seed)
    L = max(map(sum, rows))
    ids, seq, docs = torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L, dtype=torch.int32), []
    for r, lengths in enumerate(rows):
        t, mine = 0, []
        for d, n in enumerate(lengths):
            tok = torch.randint(4, vocab, (n,), generator=g)
            ids[r, t:t + n], seq[r, t:t + n] = tok, d
            mine.append((t, tok))
            t += n
        seq[r, t:] = len(lengths)                                  # right padding: a document of its own
        docs.append(mine)
    return ids, seq, docs


def assert_packed_equals_alone(model, rows=ROWS, atol=1e-10):
    ids, seq, docs = pack(rows)
    with torch.no_grad():
        packed = model(ids, seq_idx=seq)
        for r, mine in enumerate(docs):
            for start, tok in mine:
                alone = model(tok[None])[0]
                torch.testing.assert_close(packed[r, start:start + len(tok)], alone, rtol=0, atol=atol)
        assert (model(ids) - packed).abs().max() > 1e-3                 # without seq_idx the documents mix


def test_document_positions_golden():
    seq = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    assert document_positions(seq).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    mask = torch.tensor([[False, True, True, True, True, True], [False, False, True, True, True, True]])
    assert document_positions(seq, mask).tolist() == [[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 2, 3]]


def test_block_diagonal_causal_mask_golden():
    m = attention_mask(4, 4, None, "cpu", torch.tensor([[0, 0, 1, 1]]))[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_forward_equals_each_document_alone(name):
    """The default (chunked) scan: logits at every position of every document, 1e-10."""
    assert_packed_equals_alone(tiny(**CONFIGS[name]))


@pytest.mark.parametrize("name", ["MA+gates", "MMMA"])
def test_packed_forward_with_the_sequential_scan(monkeypatch, name):
    monkeypatch.setattr(mamba2, "ssm_scan", lambda x, dt, A, B, C, D, h0=None, chunk_size=16, seq_idx=None:
                        ssm_scan_ref(x, dt, A, B, C, D, h0, seq_idx))
    assert_packed_equals_alone(tiny(**CONFIGS[name]))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("name", ["MA", "MMMA+gates"])
def test_packed_forward_with_the_triton_kernel(monkeypatch, name):
    """The kernel (interpreter on CPU, fp32 maths inside): packed = alone, because a document start gives the
    same operations as a fresh scan. A small width and one channel block a program keep it fast."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(scan, "_INTERP_BLOCK_C", 64)
        monkeypatch.setattr(scan, "_INTERP_CHUNK", 8)
    kw = dict(CONFIGS[name], d_model=32, n_layers=len(CONFIGS[name]["layer_pattern"]))
    with use_backend("triton"):
        assert_packed_equals_alone(tiny(**kw), rows=[[5, 1, 6], [4, 8]], atol=1e-6)


def grads_of(model, fn):
    model.zero_grad()
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["MA", "MMMA+gates"])
def test_packed_gradients_equal_the_sum_of_separate_ones(name):
    """loss = Σ_t <logits_t, R_t> over real positions: packed and document by document, every parameter.

    BitLinear's internal RMSNorm runs in fp32 whatever the model's dtype (`BitLinear.normalize`, the
    original's bits), so the gradient of its weight is an fp32 sum over tokens, summed in another order
    here: 1e-6 relative for those; 1e-10 for every other parameter."""
    model = tiny(**CONFIGS[name]).train()
    ids, seq, docs = pack(ROWS, seed=2)
    R = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    real = torch.zeros(ids.shape, dtype=torch.bool)
    for r, mine in enumerate(docs):
        for start, tok in mine:
            real[r, start:start + len(tok)] = True
    packed = grads_of(model, lambda: (model(ids, seq_idx=seq) * R * real[..., None]).sum())

    def separate():
        return sum((model(tok[None])[0] * R[r, s:s + len(tok)]).sum() for r, mine in enumerate(docs) for s, tok in mine)
    alone = grads_of(model, separate)
    assert packed.keys() == alone.keys() and len(packed) == sum(p.requires_grad for p in model.parameters())
    for n in packed:
        tol = 1e-6 if n.endswith("rms_norm.weight") else 1e-10
        torch.testing.assert_close(packed[n], alone[n], rtol=0, atol=tol * max(1.0, alone[n].abs().max().item()),
                                   msg=n)


@pytest.mark.parametrize("name", ["MA", "MMMA+gates"])
def test_cached_decode_of_a_document_that_starts_mid_pack(name):
    """Prefill a packed row (with left padding in one row), then decode: the dynamic cache and the static
    decoder ("kv" and "latent") continue each row's last document exactly as its standalone decode."""
    model = tiny(**CONFIGS[name])
    g = torch.Generator().manual_seed(4)
    docs = [[torch.randint(4, 512, (n,), generator=g) for n in lengths] for lengths in ([7, 2], [3, 1, 5])]
    rows = [torch.cat(d) for d in docs]
    ids, mask = left_pad([r.tolist() for r in rows])                               # row 0 is left-padded
    seq = torch.zeros(ids.shape, dtype=torch.long)
    for r, d in enumerate(docs):
        bounds = torch.tensor([len(x) for x in d]).cumsum(0)
        pad = ids.shape[1] - len(rows[r])
        seq[r, pad:] = torch.bucketize(torch.arange(len(rows[r])), bounds, right=True)
    new = torch.randint(4, 512, (2, 6), generator=g)
    with torch.no_grad():
        want = [model.hidden_states(torch.cat([d[-1], new[r]])[None])[0, -6:] for r, d in enumerate(docs)]
        cache = model.new_cache(2)
        model.hidden_states(ids, attention_mask=mask, cache=cache, seq_idx=seq)
        got = torch.cat([model.hidden_states(new[:, t:t + 1], cache=cache) for t in range(6)], 1)
        for r in range(2):
            torch.testing.assert_close(got[r], want[r], rtol=0, atol=1e-10)
        for mode in ("kv", "latent"):
            dec = StaticDecoder(model, ids.shape[1] + 6, kv_mode=mode)
            dec.prefill(ids, mask, seq_idx=seq)
            static = torch.stack([decode_hidden(model, dec.cache, new[:, t]) for t in range(6)], 1)
            for r in range(2):
                torch.testing.assert_close(static[r], want[r], rtol=0, atol=1e-10)


def test_seq_idx_bad_input_raises():
    model = tiny()
    ids = torch.randint(4, 512, (2, 6))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, seq_idx=torch.tensor([[0, 0, 1, 0, 1, 1], [0] * 6]))
    with pytest.raises(ValueError, match="shape"):
        model(ids, seq_idx=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids, seq_idx=torch.zeros(2, 6))
    cache = model.new_cache(2)
    model.hidden_states(ids, cache=cache)
    with pytest.raises(ValueError, match="prefill only"):
        model.hidden_states(ids[:, :1], cache=cache, seq_idx=torch.zeros(2, 1, dtype=torch.long))
