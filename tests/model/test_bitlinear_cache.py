"""BitLinear's cached weight quantisation: same bits as recomputing it, recomputed whenever W changes;
the value multiplied is exactly Q_w(W) in every path (grad, no_grad, cached, uncached)."""
import copy

import pytest
import torch

import elleci.model.layers as layers
from elleci.model import BitLinear, ElleciConfig, ElleciLM
from elleci.model.layers import invalidate_weight_caches, watch_optimizer
from elleci.model.lora import LoraConfig, apply_lora, mark_only_lora_trainable


@pytest.fixture
def count_quantisations(monkeypatch):
    """Counts calls of `ternary_weight` (one per full quantisation of a weight)."""
    calls = []
    real = layers.ternary_weight
    monkeypatch.setattr(layers, "ternary_weight", lambda w: calls.append(w) or real(w))
    return calls


@pytest.fixture
def no_cache():
    """A context manager that turns the cache off class-wide."""
    class Off:
        def __enter__(self):
            BitLinear.cache_weights = False

        def __exit__(self, *exc):
            BitLinear.cache_weights = True
    return Off


def _layer_step(layer, x):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.rms_norm.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_outputs_and_gradients_are_bitwise_the_uncached_ones(dtype, no_cache):
    torch.manual_seed(0)
    layer, x = BitLinear(48, 20).to(dtype), torch.randn(3, 5, 48, dtype=dtype)
    with no_cache():
        ref = _layer_step(layer, x)
    miss, hit = _layer_step(layer, x), _layer_step(layer, x)     # computes the offset, then reuses it
    for a, b, c in zip(ref, miss, hit):
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(a, c)
    # the straight-through definition: value exactly Q_w(W) = (q γ) in W's dtype, gradient of W
    qw, gamma = layers.quantize_weights(layer.weight)
    w_q = layer.quantized_weight()
    assert w_q.grad_fn is not None
    assert torch.equal(w_q.detach(), (qw * gamma).to(dtype))
    with no_cache():
        assert torch.equal(layer.quantized_weight().detach(), (qw * gamma).to(dtype))
    # dW = dyᵀ x_q, as for a plain linear layer at the quantised operands
    x_q = layer.quantized_input(x).detach()
    g = torch.linspace(-1, 1, ref[0].numel()).view_as(ref[0]).to(dtype)
    assert torch.allclose(ref[2].float(), (g.reshape(-1, 20).t().float() @ x_q.reshape(-1, 48).float()),
                          rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


def _model_grads(model, batches):
    model.zero_grad(set_to_none=True)
    for ids in batches:                                     # gradient accumulation over micro-batches
        model(ids).float().logsumexp(-1).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_with_checkpointing_and_accumulation_computes_each_weight_once(count_quantisations, no_cache):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny", gradient_checkpointing=True)).train()
    n_bit = sum(isinstance(m, BitLinear) for m in model.modules())
    batches = [torch.randint(0, 512, (2, 12)) for _ in range(3)]
    with no_cache():
        ref = _model_grads(model, batches)
    count_quantisations.clear()
    got = _model_grads(model, batches)
    # uncached: 3 micro-batches x (forward + checkpoint recompute) per layer; cached: once per layer
    assert len(count_quantisations) == n_bit
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("opt_kwargs", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_optimizer_step_invalidates_the_cache(opt_kwargs, count_quantisations, no_cache):
    torch.manual_seed(0)
    layer, x = BitLinear(32, 16), torch.randn(4, 32)
    opt = watch_optimizer(torch.optim.AdamW(layer.parameters(), lr=0.05, **opt_kwargs))
    for step in range(3):
        count_quantisations.clear()
        y, *_ = _layer_step(layer, x)
        _layer_step(layer, x)
        assert len(count_quantisations) == 1                  # recomputed once after every update
        with no_cache():
            assert torch.equal(y, _layer_step(layer, x)[0])  # and equal to a fresh quantisation
        opt.step()


def test_load_state_dict_invalidates_the_cache(no_cache):
    torch.manual_seed(0)
    model, other = ElleciLM(ElleciConfig.from_name("tiny")), ElleciLM(ElleciConfig.from_name("tiny"))
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        model(ids)                                            # fills the caches with model's own weights
        expected = other(ids)
        model.load_state_dict(other.state_dict())             # copy_ into the same tensors
        assert torch.equal(model(ids), expected)
        fresh = ElleciLM(ElleciConfig.from_name("tiny"))
        model.load_state_dict(fresh.state_dict(), assign=True)   # new Parameter objects
        with no_cache():
            expected = fresh(ids)
        assert torch.equal(model(ids), expected)


def test_no_grad_and_inference_mode_fill_a_cache_usable_for_training(no_cache, count_quantisations):
    torch.manual_seed(0)
    layer, x = BitLinear(24, 8), torch.randn(5, 24)
    with no_cache():
        ref = _layer_step(layer, x)
    count_quantisations.clear()
    with torch.inference_mode():
        y_inf = layer(x)
    with torch.no_grad():
        y_ng = layer(x)
    got = _layer_step(layer, x)                               # training on the offset cached in inference mode
    assert len(count_quantisations) == 1
    assert torch.equal(y_inf, ref[0]) and torch.equal(y_ng, ref[0])
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_lora_on_bitlinear_same_gradients_and_frozen_base_quantised_once(count_quantisations, no_cache):
    torch.manual_seed(0)
    model = ElleciLM(ElleciConfig.from_name("tiny"))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["w1", "w2", "w3"], init_lora_weights=False))
    mark_only_lora_trainable(model)
    n_bit = sum(isinstance(m, BitLinear) for m in model.modules())
    batches = [torch.randint(0, 512, (2, 9))]
    with no_cache():
        ref = _model_grads(model, batches)
    count_quantisations.clear()
    got = _model_grads(model, batches)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert all("lora_" in k for k in got)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()                                                # updates the adapters only
    _model_grads(model, batches)
    assert len(count_quantisations) == n_bit                  # the frozen bases were never re-quantised


def test_writes_through_data_need_an_explicit_invalidation(no_cache):
    torch.manual_seed(0)
    layer, x = BitLinear(16, 8), torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.weight.data.mul_(-1)                            # bypasses the version counter
        invalidate_weight_caches(layer)
        with no_cache():
            expected = layer(x)
        assert torch.equal(layer(x), expected)


def test_cache_is_not_state_and_follows_dtype_and_copies():
    torch.manual_seed(0)
    layer, x = BitLinear(16, 8), torch.randn(3, 16)
    layer(x)
    assert layer._weight_cache is not None and set(layer.state_dict()) == {"weight", "rms_norm.weight"}
    assert copy.deepcopy(layer)._weight_cache is None
    layer.to(torch.bfloat16)
    assert layer._weight_cache is None
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer._weight_cache[2].dtype == torch.bfloat16


@pytest.mark.parametrize("grad", [False, True])
def test_frozen_or_no_grad_call_makes_no_weight_sized_tensor(grad, tensor_sizes):
    """Without a gradient for W (no_grad, or W frozen as under LoRA), a warm BitLinear multiplies by the cached
    Q_w(W) itself; with W trained, the straight-through view adds nothing weight-sized either (only dW)."""
    torch.manual_seed(0)
    layer, x = BitLinear(64, 48), torch.randn(2, 64)           # weight 3072 elements, activations ≤ 128
    layer.weight.requires_grad_(grad)
    layer(x)                                                   # fills the cache
    with tensor_sizes() as sizes:
        if grad:
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)
    weight_sized = [n for n in sizes.new_numels if n >= layer.weight.numel()]
    assert weight_sized == ([layer.weight.numel()] if grad else [])   # with grad: the gradient dW, once


def test_importing_elleci_installs_no_global_optimizer_hook():
    """The cache's invalidation is explicit and local (`watch_optimizer`): no global hook at import."""
    import subprocess
    import sys
    code = ("import torch.optim.optimizer as o; import elleci, elleci.model, elleci.algos, elleci.train; "
            "assert not o._global_optimizer_post_hooks and not o._global_optimizer_pre_hooks, 'global hook'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unwatched_fused_optimizer_needs_an_explicit_invalidation(count_quantisations, no_cache):
    """A fused step does not bump version counters: unwatched, the cache is stale until invalidated."""
    torch.manual_seed(0)
    layer, x = BitLinear(32, 16), torch.randn(4, 32)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, fused=True)
    _layer_step(layer, x)
    opt.step()
    count_quantisations.clear()
    _layer_step(layer, x)
    assert len(count_quantisations) == 0                      # stale: the write was invisible
    invalidate_weight_caches(layer)
    y, *_ = _layer_step(layer, x)
    assert len(count_quantisations) == 1
    with no_cache():
        assert torch.equal(y, _layer_step(layer, x)[0])
