import itertools
import math

import pytest
import torch
import torch.nn as nn

from elleci.kernels import use_backend
from elleci.model import BitLinear, ElleciConfig, ElleciLM
from elleci.model.lora import (LoraConfig, LoRALinear, SketchedLoRALinear, apply_lora, disable_adapters,
                               load_adapter, lora_modules, mark_only_lora_trainable, merge_lora, remove_lora,
                               sample_sketches, save_adapter, set_sketches, target_module_names, unmerge_lora)

MIXER_LINEARS = ["attn.in_proj", "attn.out_proj", "attn.w_q", "attn.w_kv_up", "attn.w_out"]


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", **overrides)).eval()


def _ids(seed=1, shape=(2, 11)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def _nonzero_B(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


# ---- config, init, scaling ------------------------------------------------------------------------

def test_scaling_oracles():
    assert LoraConfig(r=8, lora_alpha=16).scaling == 2.0
    assert LoraConfig(r=8, lora_alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(8))
    assert math.isclose(LoraConfig(r=8, lora_alpha=16, use_rslora=True).scaling, 5.656854, rel_tol=1e-6)


def test_init_kaiming_bound_and_zero_B():
    layer = LoRALinear(nn.Linear(64, 32, bias=False), r=8, lora_alpha=8)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64)     # U(±1/√in) = ±0.125
    assert layer.lora_A.abs().max() > 0.1                     # and not degenerate
    assert torch.count_nonzero(layer.lora_B) == 0
    g = LoRALinear(nn.Linear(64, 32), r=16, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.01


def test_bad_config_errors():
    with pytest.raises(ValueError, match="r must be"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(_model(), LoraConfig(target_modules=["attn.nonexistent"]))
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1))


def test_target_matching():
    m = _model()
    assert target_module_names(m, LoraConfig(target_modules=["attn.in_proj"])) == ["blocks.0.attn.in_proj",
                                                                                  "blocks.2.attn.in_proj"]
    assert target_module_names(m, LoraConfig(target_modules=["ffn.w1"], layers_to_transform=[1])) == ["blocks.1.ffn.w1"]
    assert target_module_names(m, LoraConfig(target_modules=r"blocks\.3\.ffn\.w[12]")) == ["blocks.3.ffn.w1",
                                                                                           "blocks.3.ffn.w2"]
    every = target_module_names(m, LoraConfig(target_modules="all-linear", exclude_modules=["ffn.w3"]))
    assert "lm_head" not in every and not any(n.endswith("w3") for n in every) and "blocks.0.attn.x_proj" in every


# ---- the adapted model ---------------------------------------------------------------------------

def test_zero_B_equals_base_model_exactly():
    m = _model()
    ids = _ids()
    base = m(ids)
    apply_lora(m, LoraConfig(r=4, target_modules="all-linear"))  # Linear and BitLinear layers
    assert torch.equal(m(ids), base)


def test_only_lora_trainable_and_gradients_reach_it():
    m = _model()
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules=MIXER_LINEARS + ["ffn.w1"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    m.train()
    m(_ids()).logsumexp(-1).mean().backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in lora_modules(m).values())
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    mark_only_lora_trainable(m)  # idempotent
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trainable


def test_disable_adapters_is_the_base_and_restores():
    m = _model()
    ids = _ids()
    base = m(ids)
    apply_lora(m, LoraConfig(r=4, target_modules="all-linear"))
    _nonzero_B(m)
    adapted = m(ids)
    assert (adapted - base).abs().max() > 1e-3
    with disable_adapters(m):
        assert torch.equal(m(ids), base)
    assert torch.equal(m(ids), adapted)


def test_merge_equals_unmerged_and_unmerge_restores():
    m = _model()
    ids = _ids()
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules=MIXER_LINEARS))
    _nonzero_B(m)
    w0 = {n: mod.base_layer.weight.clone() for n, mod in lora_modules(m).items()}
    unmerged = m(ids)
    merge_lora(m)
    assert torch.allclose(m(ids), unmerged, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_adapters(m):
            pass
    unmerge_lora(m)
    for n, mod in lora_modules(m).items():
        assert torch.allclose(mod.base_layer.weight, w0[n], rtol=0, atol=1e-6)
    assert torch.allclose(m(ids), unmerged, atol=1e-5)
    merge_lora(m, unload=True)                       # a plain model again
    assert not lora_modules(m) and torch.allclose(m(ids), unmerged, atol=1e-5)
    assert set(m.state_dict()) == set(_model().state_dict())


def test_merge_refuses_bitlinear_by_name():
    m = _model()
    apply_lora(m, LoraConfig(r=4, target_modules=["attn.w_q", "ffn.w2"]))
    with pytest.raises(ValueError, match=r"BitLinear layers \['blocks.0.ffn.w2'"):
        merge_lora(m)
    assert not any(mod.merged for mod in lora_modules(m).values())   # nothing half-merged


def test_bitlinear_adapter_reads_the_quantised_input():
    torch.manual_seed(0)
    base = BitLinear(24, 16)
    layer = LoRALinear(base, r=3, lora_alpha=6, init_lora_weights=False).eval()
    x = torch.randn(5, 24)
    x_q, w_q = base.quantized_operands(x)
    expect = x_q @ w_q.t() + 2.0 * (x_q @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.allclose(layer(x), expect, atol=1e-5)


def test_dropout_eval_deterministic_train_leaves_base_path():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, lora_dropout=0.5)
    x = torch.randn(8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert torch.equal(layer(x), base(x))            # B = 0: dropout only touches the adapter branch
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), layer(x))        # the adapter branch sees a fresh mask per call


def test_remove_lora_and_double_apply():
    m = _model()
    ids = _ids()
    base = m(ids)
    apply_lora(m, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, LoraConfig(r=2))
    _nonzero_B(m)
    remove_lora(m)
    assert not lora_modules(m) and torch.equal(m(ids), base)


def test_lora_layer_uses_the_kernel_through_the_dispatch():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    for base in (nn.Linear(20, 12), BitLinear(20, 12)):
        layer = LoRALinear(base, r=3, init_lora_weights=False).eval()
        x = torch.randn(2, 7, 20, requires_grad=True)
        outs = []
        for backend in ("torch", "triton"):
            layer.zero_grad()
            x.grad = None
            with use_backend(backend):
                y = layer(x)
            y.square().sum().backward()
            outs.append((y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- adapter files -----------------------------------------------------------------------------

def test_save_load_adapter_round_trip(tmp_path):
    m = _model()
    apply_lora(m, LoraConfig(r=4, lora_alpha=16, target_modules=["attn.in_proj", "ffn.w1"]))
    _nonzero_B(m)
    ids = _ids()
    want = m(ids)
    save_adapter(m, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                           "manifest.json"}
    fresh = _model()
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(ids), want)
    assert fresh.lora_config.lora_alpha == 16


def test_load_adapter_onto_other_dims_fails_clearly(tmp_path):
    m = _model()
    apply_lora(m, LoraConfig(r=4, target_modules=["attn.in_proj"]))
    save_adapter(m, tmp_path / "ad")
    other = _model(d_model=32, kv_lora_rank=16)
    with pytest.raises(ValueError, match="adapter was made for in=64.*this layer is in=32"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(_model(), tmp_path)


def test_lora_checkpoint_keys_give_a_hint(tmp_path):
    m = _model()
    apply_lora(m, LoraConfig(r=2, target_modules=["attn.w_q"]))
    m.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="merge_lora"):
        ElleciLM.from_pretrained(tmp_path / "m")


# ---- sketched LoRA ----------------------------------------------------------------------------

def _sketched(r=4, seed=0):
    torch.manual_seed(seed)
    layer = SketchedLoRALinear(nn.Linear(10, 6, dtype=torch.float64), r=r, lora_alpha=r, init_lora_weights=False)
    return layer.double()


def test_sketch_expectation_over_all_subsets_is_the_full_adapter():
    layer = _sketched(r=4)
    x = torch.randn(3, 10, dtype=torch.float64)
    full = layer(x)
    outs = []
    for subset in itertools.combinations(range(4), 2):
        layer.set_sketch(list(subset))
        outs.append(layer(x))
    layer.clear_sketch()
    assert torch.allclose(torch.stack(outs).mean(0), full, atol=1e-12)


def test_sketch_monte_carlo_mean_and_support():
    layer = _sketched(r=8)
    x = torch.randn(4, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = layer(x) - layer.base_layer(x)
        acc = torch.zeros_like(full)
        n = 4000
        for _ in range(n):
            idx = layer.sample_sketch(2, g)
            assert idx.numel() == 2 and layer.sketch_mask().sum() == 2     # FSLoRA bug regression: really k ranks
            acc += layer(x) - layer.base_layer(x)
    err = (acc / n - full).abs().max() / full.abs().max()
    assert err < 0.05
    # B S A = (r/k) Σ_{j∈I} b_j a_jᵀ
    layer.set_sketch([1, 6])
    A, B, s = layer.adapter()
    manual = (8 / 2) * (torch.outer(layer.lora_B[:, 1], layer.lora_A[1]) + torch.outer(layer.lora_B[:, 6], layer.lora_A[6]))
    assert torch.allclose(s * B @ A, layer.scaling * manual)


def test_sketch_gradients_touch_only_selected_ranks():
    layer = _sketched(r=6)
    layer.set_sketch([0, 4])
    layer(torch.randn(5, 10, dtype=torch.float64)).sum().backward()
    rows = layer.lora_A.grad.abs().sum(1)
    cols = layer.lora_B.grad.abs().sum(0)
    for j in range(6):
        assert (rows[j] > 0) == (j in (0, 4)) and (cols[j] > 0) == (j in (0, 4))


def test_sketch_validation_and_model_helpers():
    layer = _sketched(r=4)
    for bad, msg in [([], "at least one"), ([0, 4], r"\[0, 4\)"), ([1, 1], "distinct")]:
        with pytest.raises(ValueError, match=msg):
            layer.set_sketch(bad)
    with pytest.raises(ValueError, match="k must be"):
        layer.sample_sketch(5)
    m = _model()
    apply_lora(m, LoraConfig(r=8, target_modules=["attn.in_proj", "ffn.w1"]), sketched=True)
    sk = sample_sketches(m, 3, torch.Generator().manual_seed(0))
    assert len(sk) == 6 and all(v.numel() == 3 for v in sk.values())   # 2 in_proj + 4 ffn.w1
    assert len({tuple(v.tolist()) for v in sk.values()}) > 1          # independent per layer
    set_sketches(m, None)
    assert all(mod.sketch is None for mod in lora_modules(m).values())
    with pytest.raises(KeyError, match="no SketchedLoRALinear"):
        set_sketches(m, {"blocks.0.attn.w_q": torch.tensor([0])})
