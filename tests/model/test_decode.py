"""Static-cache decoding (elleci.model.decode) against the dynamic-cache reference (generate, full forward)."""
import pytest
import torch

from elleci.model import ElleciConfig, ElleciLM
from elleci.model.decode import StaticDecoder, decode_hidden, generate_static, stop_column
from elleci.model.generation import generate, left_pad
from elleci.model.lora import LoraConfig, apply_lora
from elleci.model.mamba2 import Mamba2Mixer, MambaCache

PATTERNS = {"v1 (MA)": dict(layer_pattern="MA"),
            "v2 (MMMA, gates)": dict(layer_pattern="MMMA", mamba_input_gate=True, mla_latent_gate=True)}
CASES = [(kw, mode) for kw in PATTERNS.values() for mode in ("kv", "latent")]
CASE_IDS = [f"{name}-{mode}" for name in PATTERNS for mode in ("kv", "latent")]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", **kw)).eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kw,mode", CASES, ids=CASE_IDS)
def test_step_equals_full_forward_at_every_position_float64(kw, mode):
    """Left-padded prompts of different lengths, then 12 tokens stepped through the static cache:
    hidden states and logits at every position equal the full forward over prompt + tokens."""
    model = tiny(**kw).double()
    ids, mask = left_pad(prompts((6, 2, 9)))                            # P = 9
    P, n = ids.shape[1], 12
    new = torch.randint(4, 512, (3, n), generator=torch.Generator().manual_seed(2))
    full, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], 1)
    with torch.no_grad():
        ref_h = model.hidden_states(full, attention_mask=full_mask)     # [3, P + n, d]
        ref_logits = model.lm_head(ref_h).float()

        dec = StaticDecoder(model, P + n, kv_mode=mode)
        dec.prefill(ids, mask)
        hidden = torch.stack([decode_hidden(model, dec.cache, new[:, t]) for t in range(n)], 1)
        torch.testing.assert_close(hidden, ref_h[:, P:], rtol=0, atol=1e-10)

        logits = [dec.prefill(ids, mask)] + [dec.step(new[:, t]) for t in range(n - 1)]
        torch.testing.assert_close(torch.stack(logits, 1), ref_logits[:, P - 1:P + n - 1], rtol=0, atol=1e-6)


def test_mamba_step_is_forward_and_in_place():
    """fp32: Mamba2Mixer.step gives forward-with-a-cache's outputs and states (to fp32 rounding: two code paths,
    no bitwise guarantee on another CPU), and keeps the state's addresses."""
    cfg = ElleciConfig.from_name("tiny", mamba_input_gate=True)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg).eval()
    u = torch.randn(2, 9, cfg.d_model)
    ref, state = mixer.empty_cache(2, u.device, u.dtype), mixer.empty_cache(2, u.device, u.dtype)
    with torch.no_grad():
        mixer(u[:, :5], cache=ref)
        mixer(u[:, :5], cache=state)
        state = MambaCache(*(t.clone() for t in (state.conv, state.ssm, state.prev_u)))
        ptrs = [t.data_ptr() for t in (state.conv, state.ssm, state.prev_u)]
        for t in range(5, 9):
            torch.testing.assert_close(mixer.step(u[:, t:t + 1], state), mixer(u[:, t:t + 1], cache=ref),
                                       rtol=1e-6, atol=1e-6)
            for a, b in ((state.conv, ref.conv), (state.ssm, ref.ssm), (state.prev_u, ref.prev_u)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert [t.data_ptr() for t in (state.conv, state.ssm, state.prev_u)] == ptrs


@pytest.mark.parametrize("kw,mode", CASES, ids=CASE_IDS)
def test_generate_static_equals_generate_greedy_and_sampled(kw, mode):
    model = tiny(3, **kw).double()
    ps = prompts((3, 11, 1, 7))
    greedy = generate(model, ps, 12, temperature=0.0)
    assert torch.equal(generate_static(model, ps, 12, temperature=0.0, kv_mode=mode), greedy)
    sampling = dict(temperature=1.0, top_k=50, top_p=0.9)
    ref = generate(model, ps, 12, generator=torch.Generator().manual_seed(7), **sampling)
    got = generate_static(model, ps, 12, generator=torch.Generator().manual_seed(7), kv_mode=mode, **sampling)
    assert torch.equal(got, ref)
    assert not torch.equal(ref, greedy)                                 # sampling did sample


@pytest.mark.parametrize("mode", ["kv", "latent"])
@pytest.mark.parametrize("every", [1, 3, 16])
def test_eos_stop_pad_fill_and_trim_equal_generate(mode, every):
    model = tiny(2).double()
    ps = [[5, 6, 7], [9, 10, 11, 12]]
    free = generate(model, ps, 10, temperature=0.0)
    P = free.shape[1] - 10
    # one EOS per row, emitted early: both rows stop, so generate ends before 10 tokens
    eos = [int(free[0, P + 2]), int(free[1, P + 4])]
    ref = generate(model, ps, 10, temperature=0.0, eos_token_id=eos, pad_token_id=1)
    assert ref.shape[1] - P < 10
    got = generate_static(model, ps, 10, temperature=0.0, eos_token_id=eos, pad_token_id=1, kv_mode=mode,
                          eos_check_every=every)
    assert torch.equal(got, ref)
    # one row never stops (EOS only in row 0's output): all 10 tokens, row 0 padded after its EOS
    eos0 = int(free[0, P + 2])
    if eos0 not in free[1, P:].tolist():
        ref = generate(model, ps, 10, temperature=1.0, eos_token_id=eos0, generator=torch.Generator().manual_seed(3))
        got = generate_static(model, ps, 10, temperature=1.0, eos_token_id=eos0, kv_mode=mode, eos_check_every=every,
                              generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, ref)


def test_stop_column():
    eos = torch.tensor([3])
    assert stop_column(torch.tensor([[1, 3, 0, 0], [3, 0, 0, 0]]), eos) == 2
    assert stop_column(torch.tensor([[1, 3, 0, 0], [2, 2, 2, 2]]), eos) == 4
    assert stop_column(torch.tensor([[3, 3], [3, 5]]), eos) == 1


def test_buffers_keep_their_addresses_across_steps_and_calls():
    model = tiny(4, **PATTERNS["v2 (MMMA, gates)"]).double()
    ps = prompts((5, 3))
    dec = StaticDecoder(model, max_len=16, kv_mode="kv")
    first = dec.generate(ps, 8, temperature=0.0)
    ptrs = [t.data_ptr() for t in dec.cache.tensors()]
    ids, mask = left_pad(ps)
    dec.prefill(ids, mask)
    for t in range(6):
        dec.step(torch.full((2,), 7 + t))
        assert [t.data_ptr() for t in dec.cache.tensors()] == ptrs
    again = dec.generate(ps, 8, temperature=0.0)                        # reuses the buffers, same result
    assert [t.data_ptr() for t in dec.cache.tensors()] == ptrs
    assert torch.equal(again, first) and torch.equal(first, generate(model, ps, 8, temperature=0.0))
    other = dec.generate(prompts((2, 4, 6)), 8, temperature=0.0)       # another batch size: new buffers
    assert torch.equal(other, generate(model, prompts((2, 4, 6)), 8, temperature=0.0))
    model.float()                                                       # another dtype: new buffers
    assert dec.generate(ps, 8, temperature=0.0).shape[0] == 2           # (fp32 tokens of two code paths: not compared)
    ids, mask = left_pad(ps)
    torch.testing.assert_close(dec.prefill(ids, mask), model(ids, attention_mask=mask)[:, -1], rtol=1e-5, atol=1e-5)
    assert dec.cache.layers[0].ssm.dtype == torch.float32 and dec.cache.layers[3].k.dtype == torch.float32


@pytest.mark.parametrize("mode", ["kv", "latent"])
def test_kv_mode_expands_one_token_per_step_latent_mode_all(mode):
    """The up-projection sees 1 row per step in "kv" mode and all T_max columns in "latent" mode."""
    model = tiny(5)
    seen = []
    hooks = [blk.attn.w_kv_up.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
             for blk in model.blocks if blk.kind == "A"]
    dec = StaticDecoder(model, max_len=20, kv_mode=mode)
    ids, mask = left_pad(prompts((4, 6)))
    dec.prefill(ids, mask)
    seen.clear()
    dec.step(torch.tensor([5, 6]))
    for h in hooks:
        h.remove()
    assert seen == [1 if mode == "kv" else 20] * 2


def test_lora_adapted_model_decodes_like_generate():
    model = tiny(6).double()
    apply_lora(model, LoraConfig(r=4, target_modules=["attn.w_q", "attn.in_proj", "ffn.w1"], init_lora_weights=False))
    model.double().eval()
    ps = prompts((4, 2))
    assert torch.equal(generate_static(model, ps, 8, temperature=0.0), generate(model, ps, 8, temperature=0.0))


def test_lm_generate_routes_to_static_path_by_keyword():
    model = tiny(7).double()
    ps = prompts((3, 5))
    ref = model.generate(ps, 6, temperature=0.0)
    assert torch.equal(model.generate(ps, 6, temperature=0.0, static=True, kv_mode="latent", cuda_graph=False), ref)
    assert model.training is False


def test_clear_errors():
    model = tiny()
    ps = prompts((3, 2))
    with pytest.raises(ValueError, match="kv_mode"):
        generate_static(model, ps, 4, kv_mode="dense")
    with pytest.raises(ValueError, match="kv_mode"):
        StaticDecoder(model, 8, kv_mode="kvcache")
    with pytest.raises(ValueError, match="cuda_graph=True"):
        StaticDecoder(model, 8, cuda_graph=True)
    with pytest.raises(ValueError, match="eos_check_every"):
        generate_static(model, ps, 4, eos_check_every=0)
    with pytest.raises(ValueError, match="max_len"):
        StaticDecoder(model, 0)
    dec = StaticDecoder(model, max_len=5)
    with pytest.raises(ValueError, match="before prefill"):
        dec.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="need 6 cache columns, but max_len=5"):
        dec.generate(ps, 4)                                             # 3 + (4 - 1) columns
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(*left_pad([[1] * 6]))
    ids, mask = left_pad(ps)
    dec.prefill(ids, mask)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        dec.step(torch.tensor([1, 2, 3]))
    dec.step(torch.tensor([1, 2]))
    dec.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="static cache is full"):
        dec.step(torch.tensor([1, 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["kv", "latent"])
def test_cuda_graph_replay_equals_eager_and_generate(mode):
    model = tiny(8, **PATTERNS["v2 (MMMA, gates)"]).double().cuda()
    ps = prompts((5, 2, 9))
    ids, mask = left_pad(ps, device="cuda")
    new = torch.randint(4, 512, (3, 10), device="cuda")
    graphed, eager = StaticDecoder(model, 20, mode, cuda_graph=True), StaticDecoder(model, 20, mode, cuda_graph=False)
    for dec in (graphed, eager):
        dec.prefill(ids, mask)
    for t in range(10):
        torch.testing.assert_close(graphed.step(new[:, t]).clone(), eager.step(new[:, t]), rtol=0, atol=1e-10)
    graph = graphed._graph
    assert graph is not None
    ref = generate(model, ps, 10, temperature=1.0, top_p=0.9, generator=torch.Generator("cuda").manual_seed(0))
    got = graphed.generate(ps, 10, temperature=1.0, top_p=0.9, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(got, ref) and graphed._graph is graph            # the graph is reused across calls
    # fp32 weights with bf16 autocast: replay and eager run the same kernels; the bound allows one
    # BitLinear 8-bit rounding tie (see test_lm's fp32 cached-decode test) should cuBLAS pick another algorithm
    model = tiny(8, **PATTERNS["v2 (MMMA, gates)"]).cuda()
    graphed, eager = StaticDecoder(model, 20, mode, cuda_graph=True), StaticDecoder(model, 20, mode, cuda_graph=False)
    for dec in (graphed, eager):
        dec.prefill(ids, mask)
    for t in range(10):
        torch.testing.assert_close(graphed.step(new[:, t]).clone(), eager.step(new[:, t]), rtol=0, atol=0.05)


def test_weights_key_changes_when_a_parameter_is_written_or_moved():
    """What decides that a captured CUDA graph is stale (checked on CPU: the key, not the graph)."""
    from elleci.model.decode import _weights_key
    model = tiny()
    key = _weights_key(model)
    assert _weights_key(model) == key
    with torch.no_grad():
        model.blocks[0].ffn.w1.weight.mul_(1.0)                         # an in-place write bumps the version
    assert _weights_key(model) != key
    key = _weights_key(model)
    model.double()                                                      # new storage
    assert _weights_key(model) != key
