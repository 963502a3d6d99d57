"""The frozen ternary base: same function as the latent model, packed storage, checkpoints, memory."""
import copy
import subprocess
import sys

import pytest
import torch

import elleci.kernels.ternary as kt
from elleci.model import BitLinear, ElleciConfig, ElleciLM
from elleci.model.layers import quantize_weights
from elleci.model.lora import LoraConfig, apply_lora, disable_adapters
from elleci.model.ternary import (TernaryLinear, apply_frozen_base, freeze_ternary, frozen_base_bytes,
                                  ternary_layer_names)


def _tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny")).to(dtype).eval()


def _ids(seed=1, shape=(2, 11)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_frozen_layer_holds_exactly_the_codes_and_scale():
    torch.manual_seed(0)
    layer = BitLinear(37, 9)                              # in not a multiple of 4: padded last plane
    frozen = TernaryLinear.from_bitlinear(copy.deepcopy(layer))
    codes, gamma = quantize_weights(layer.weight)
    assert frozen.weight_packed.dtype == torch.uint8 and frozen.weight_packed.shape == (9, 10)
    assert frozen.weight_scale.dtype == torch.float32 and frozen.weight_scale.item() == gamma.item()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert torch.equal(frozen.ternary_weight(dtype), (codes * gamma).to(dtype))   # the value BitLinear uses
        assert torch.equal(frozen.ternary_weight(dtype), copy.deepcopy(layer).to(dtype).cached_ternary_weight())
    frozen.to(torch.bfloat16)                             # γ keeps its fp32 value through .to(dtype)
    assert frozen.weight_scale.dtype == torch.float32 and frozen.weight_scale.item() == gamma.item()
    assert frozen.rms_norm.weight.dtype == torch.bfloat16 and frozen.weight_packed.dtype == torch.uint8


def test_float64_frozen_model_gives_the_latent_logits():
    model = _tiny(torch.float64)
    ids = _ids()
    ref = model(ids)
    freeze_ternary(model)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert sum(isinstance(m, TernaryLinear) for m in model.modules()) == 3 * model.config.n_layers
    got = model(ids)
    # same operands, only the order of the fp64 sums may differ: far below any real difference (O(1) logits)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_bf16_frozen_model_within_the_bf16_rounding_of_the_latent_model():
    exact = _tiny(torch.float64)(_ids())
    model = _tiny(torch.bfloat16)
    latent = model(_ids()).double()
    frozen = freeze_ternary(model)(_ids()).double()
    err_latent = (latent - exact).abs().max()
    # both compute the same bf16 operands; the frozen path may only round differently inside its matmuls,
    # so it must be as close to the fp64 model as the latent bf16 model is (up to a factor for that rounding)
    assert (frozen - exact).abs().max() <= 2 * err_latent
    assert (frozen - latent).abs().max() <= 2 * err_latent


def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logp = model(ids).log_softmax(-1)
    loss = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("order", ["lora_then_freeze", "freeze_then_lora"])
def test_lora_gradients_on_a_frozen_ternary_base_equal_the_latent_ones(order):
    ids = _ids(shape=(2, 9))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = _tiny(torch.float64).train()
    torch.manual_seed(5)
    apply_lora(model, cfg)
    ref_loss, ref = _lora_grads(model, ids)
    frozen = _tiny(torch.float64).train()
    if order == "freeze_then_lora":
        freeze_ternary(frozen)
        torch.manual_seed(5)
        apply_lora(frozen, cfg)
    else:
        torch.manual_seed(5)
        apply_lora(frozen, cfg)
        freeze_ternary(frozen)
    assert any(isinstance(m.base_layer, TernaryLinear) for m in frozen.modules() if hasattr(m, "base_layer"))
    loss, got = _lora_grads(frozen, ids)
    names = {n.replace(".base_layer", "") for n in ref}
    assert names == {n.replace(".base_layer", "") for n in got} and all("lora_" in n for n in got)
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-12)
    ref = {n.replace(".base_layer", ""): g for n, g in ref.items()}
    for n, g in got.items():
        assert torch.allclose(g, ref[n.replace(".base_layer", "")], rtol=1e-10, atol=1e-12), n
    with torch.no_grad(), disable_adapters(frozen):       # the reference pass of DPO: the frozen base alone
        base_only = frozen(ids)
    assert torch.allclose(base_only, _tiny(torch.float64)(ids), rtol=0, atol=1e-12)


def test_no_weight_sized_tensor_in_the_frozen_forward_and_dx(tensor_sizes, monkeypatch):
    monkeypatch.setattr(kt, "TILE_ROWS", 8)               # tiles of 8 x 64 / 96 x 8 weights in a 64 x 96 layer
    torch.manual_seed(0)
    layer = TernaryLinear.from_bitlinear(BitLinear(64, 96))
    x = torch.randn(3, 64, requires_grad=True)
    with tensor_sizes() as sizes:
        with torch.no_grad():
            layer(x)
        layer(x).sum().backward()                         # dx (for an adapter or the layers below)
    assert x.grad is not None and max(sizes.new_numels) < 64 * 96 // 4


def test_frozen_dx_is_the_latent_dx():
    torch.manual_seed(0)
    latent = BitLinear(40, 24).double()
    latent.weight.requires_grad_(False)
    frozen = TernaryLinear.from_bitlinear(copy.deepcopy(latent))
    x = torch.randn(5, 40, dtype=torch.float64)
    g = torch.randn(5, 24, dtype=torch.float64)
    grads = []
    for layer in (latent, frozen):
        xi = x.clone().requires_grad_()
        layer(xi).backward(g)
        grads.append((xi.grad, layer.rms_norm.weight.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=0, atol=1e-12)


def test_frozen_ternary_checkpoint_saves_and_loads(tmp_path):
    model = freeze_ternary(_tiny())
    ids = _ids()
    expected = model(ids)
    model.save_pretrained(tmp_path / "frozen")
    from safetensors import safe_open
    with safe_open(tmp_path / "frozen" / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.ffn.w1.weight_packed").dtype == torch.uint8
    assert "blocks.0.ffn.w1.weight" not in keys and len(ternary_layer_names(keys)) == 12
    loaded = ElleciLM.from_pretrained(tmp_path / "frozen").eval()
    assert isinstance(loaded.blocks[0].ffn.w1, TernaryLinear)
    assert torch.equal(loaded(ids), expected)             # same tensors, same code path
    half = ElleciLM.from_pretrained(tmp_path / "frozen", dtype=torch.bfloat16)
    w1 = half.blocks[1].ffn.w1
    assert w1.weight_packed.dtype == torch.uint8 and w1.weight_scale.dtype == torch.float32
    assert half.token_emb.weight.dtype == torch.bfloat16 and w1.rms_norm.weight.dtype == torch.bfloat16
    assert w1.weight_scale.item() == model.blocks[1].ffn.w1.weight_scale.item()
    # the latent form still loads as before, and a latent checkpoint frozen after loading is the same model
    _tiny().save_pretrained(tmp_path / "latent")
    again = freeze_ternary(ElleciLM.from_pretrained(tmp_path / "latent").eval())
    assert torch.equal(again.state_dict()["blocks.2.ffn.w3.weight_packed"], model.state_dict()["blocks.2.ffn.w3.weight_packed"])


def test_packed_keys_for_a_layer_the_model_lacks_are_refused(tmp_path):
    from elleci.model.checkpoint import model_from_state_dict
    state = freeze_ternary(_tiny()).state_dict()
    state["blocks.0.attn.in_proj.weight_packed"] = torch.zeros(3, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="in_proj.*not a BitLinear"):
        model_from_state_dict(ElleciConfig.from_name("tiny"), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_frozen_base_bytes_counts_the_resident_tensors(dtype):
    config = ElleciConfig.from_name("tiny")
    model = _tiny(dtype)
    latent = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ffn = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, BitLinear))
    assert frozen_base_bytes(config, dtype, frozen_base="none", weight_cache=False) == latent
    assert frozen_base_bytes(config, dtype, frozen_base="none") == latent + ffn
    freeze_ternary(model)
    frozen = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert frozen_base_bytes(config, dtype) == frozen < latent
    v1 = ElleciConfig.from_name("elleci-v1")              # the goal: ≤ 1.5 GB for elleci-v1
    assert frozen_base_bytes(v1) < 1.5e9 < frozen_base_bytes(v1, frozen_base="none", weight_cache=False)


def test_frozen_base_setting_is_checked():
    model = _tiny()
    assert apply_frozen_base(model, "none") is model and isinstance(model.blocks[0].ffn.w1, BitLinear)
    apply_frozen_base(model, "ternary")
    assert isinstance(model.blocks[0].ffn.w1, TernaryLinear)
    with pytest.raises(ValueError, match="frozen_base = 'int4'; allowed"):
        apply_frozen_base(model, "int4")
    with pytest.raises(ValueError, match="no BitLinear named"):
        freeze_ternary(_tiny(), names=["blocks.0.attn.in_proj"])


def test_generation_on_a_frozen_base_equals_the_latent_base():
    model = _tiny(torch.float64)
    prompt = _ids(shape=(1, 5))
    ref = model.generate(prompt, 6, temperature=0.0)
    frozen = freeze_ternary(model)
    assert torch.equal(frozen.generate(prompt, 6, temperature=0.0), ref)
    assert torch.equal(frozen.generate(prompt, 6, temperature=0.0, static=True), ref)


def test_build_in_dtype_restores_the_default_dtype():
    model = ElleciLM(ElleciConfig.from_name("tiny"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError, match="floating-point"):
        ElleciLM(ElleciConfig.from_name("tiny"), dtype=torch.int8)
    assert torch.get_default_dtype() == torch.float32


_PEAK = """
import sys, torch
from elleci.model.checkpoint import read_safetensors
def peak_mib():   # VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
before = peak_mib()
state = read_safetensors(sys.argv[1], dtype=torch.bfloat16)
assert all(t.dtype == torch.bfloat16 for t in state.values())
print(peak_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_with_dtype_converts_tensor_by_tensor(tmp_path):
    """8 fp32 tensors of 32 MiB read as bf16: the peak grows by the 128 MiB result plus about one tensor
    (mapped and copied: 64 MiB), not by the 256 MiB file plus the result (384 MiB)."""
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.zeros(8 << 20) for i in range(8)}, path)
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True)
    grew = float(out.stdout.split()[-1])
    assert 128 <= grew < 128 + 64 + 48, grew


def test_decoding_rows_use_the_integer_path_within_the_float_paths_rounding(monkeypatch):
    calls = []
    real = kt.ternary_linear_int8
    monkeypatch.setattr("elleci.model.ternary.ternary_linear_int8", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = TernaryLinear.from_bitlinear(BitLinear(64, 40)).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)                                     # no gradient, 3 rows: integer path
    assert len(calls) == 1
    slow = layer(x.requires_grad_())                        # a gradient to carry: the float path
    assert len(calls) == 1
    exact = layer.double()(x.detach().double())             # float64: always the float path
    assert len(calls) == 1
    err_float = (slow.double() - exact).abs().max()
    assert (fast.double() - exact).abs().max() <= max(err_float, 2 ** -8 * exact.abs().max())


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_original_with_dtype_converts_each_tensor_and_keeps_no_file_pages(tmp_path, zip_format):
    """From a path with dtype: the file is mapped (zip format) or read (legacy), each tensor converted; the
    result equals loading and casting, and owns its memory (writable, independent of the file)."""
    model = _tiny()
    path = tmp_path / "orig.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    from elleci.model import load_original
    for dtype in (torch.bfloat16, torch.float32):
        loaded = load_original(path, n_heads=4, dtype=dtype)
        expected = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        got = loaded.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        with torch.no_grad():
            loaded.lm_head.weight.add_(1)                 # in place: would fail or write through a read-only map
        assert torch.equal(load_original(path, n_heads=4, dtype=dtype).lm_head.weight, expected["lm_head.weight"])


@pytest.mark.parametrize("rows", [1, 2])
def test_one_or_two_decoding_rows_use_the_compiled_packed_loop_within_the_float_paths_rounding(monkeypatch, rows):
    calls = []
    real = kt.ternary_linear_rows
    monkeypatch.setattr("elleci.model.ternary.ternary_linear_rows", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = TernaryLinear.from_bitlinear(BitLinear(66, 40)).to(torch.bfloat16)   # K = 66: padded to 68 columns
    x = torch.randn(rows, 66, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)
    assert len(calls) == 1 and fast.shape == (rows, 40) and fast.dtype == torch.bfloat16
    slow = layer(x.requires_grad_())                        # the float path
    exact = layer.double()(x.detach().double())
    err_float = (slow.double() - exact).abs().max()
    assert (fast.double() - exact).abs().max() <= max(err_float, 2 ** -8 * exact.abs().max())


def test_the_packed_loop_is_the_reference_product():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 2, (37, 70), generator=g, dtype=torch.int8)
    packed, scale = kt.pack_ternary(codes), torch.tensor(0.37)
    x = torch.randn(2, 70, generator=g)
    got = kt.ternary_linear_rows(x, packed, scale, 70)
    want = kt.ternary_linear_ref(x.double(), packed, scale.double(), 70)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)   # fp32 sums of exact products
