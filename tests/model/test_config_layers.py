import json
import math

import pytest
import torch
import torch.nn.functional as F

from elleci.model import BitLinear, ElleciConfig, ElleciLM, RMSNorm
from elleci.model.layers import apply_rope, quantize_activations, quantize_weights, rope_cos_sin


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [("elleci-v1", 1_377_245_376), ("elleci-v2", 1_476_434_376)])
def test_preset_parameter_counts_exact(name, expected):
    with torch.device("meta"):
        model = ElleciLM(ElleciConfig.from_name(name))
    assert model.num_parameters() == expected


def test_preset_layer_patterns_and_gates():
    v1, v2 = ElleciConfig.from_name("elleci-v1"), ElleciConfig.from_name("elleci-v2")
    assert v1.layer_types[:4] == list("MAMA") and not v1.mamba_input_gate and not v1.mla_latent_gate
    assert [i for i, t in enumerate(v2.layer_types) if t == "A"] == [3, 7, 11, 15, 19, 23]
    assert v2.mamba_input_gate and v2.mla_latent_gate
    assert v1.ffn_dim == 5632 and ElleciConfig.from_name("tiny", d_model=768, n_heads=12).ffn_dim == 2048


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_heads=5), "does not divide d_model"),
    (dict(d_model=48, n_heads=16), "must be even for RoPE"),
    (dict(mamba_heads=3), "does not divide d_inner"),
    (dict(layer_pattern="MX"), "layer_pattern"),
    (dict(vocab_size=0), "vocab_size"),
    # finding 7 of issue 18: each of these loaded on main (norm_eps <= 0: NaN logits)
    (dict(norm_eps=0.0), "norm_eps must be a finite positive number, got 0.0"),
    (dict(norm_eps=-1e-6), "norm_eps must be a finite positive number"),
    (dict(norm_eps=float("nan")), "norm_eps must be a finite positive number, got nan"),
    (dict(norm_eps="1e-6"), "norm_eps must be a finite positive number, got '1e-6'"),
    (dict(rope_base=0), "rope_base must be a finite positive number"),
    (dict(rope_base=-10000.0), "rope_base must be a finite positive number"),
    (dict(rope_base=float("inf")), "rope_base must be a finite positive number"),
    (dict(init_std=-0.02), "init_std must be a finite positive number"),
    (dict(ffn_hidden=170.5), "ffn_hidden must be a positive int or null, got 170.5"),
    (dict(ffn_hidden=True), "ffn_hidden must be a positive int"),
    (dict(n_layers=True), "n_layers must be a positive int, got True"),
    (dict(d_model=64.0), "d_model must be a positive int, got 64.0"),
    (dict(autocast="no"), "autocast must be true or false, got 'no'"),
    (dict(mla_latent_gate=1), "mla_latent_gate must be true or false, got 1"),
    (dict(dropout="0.1"), r"dropout must be in \[0, 1\), got '0.1'"),
])
def test_bad_config_errors_name_the_problem(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ElleciConfig.from_name("tiny", **kwargs)


def test_config_json_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 512,\n "d_model": 64,,}')
    with pytest.raises(ValueError, match=r"config.json:2: invalid config JSON \(Expecting property name"):
        ElleciConfig.from_json(path)
    path.write_text(json.dumps({**ElleciConfig.from_name("tiny").to_dict(), "norm_eps": -1.0}))
    with pytest.raises(ValueError, match=r"config.json: ElleciConfig: norm_eps must be a finite positive number"):
        ElleciConfig.from_json(path)
    path.write_text(json.dumps({**ElleciConfig.from_name("tiny").to_dict(), "n_head": 4}))
    with pytest.raises(ValueError, match=r"config.json: config has unknown field\(s\) \['n_head'\]"):
        ElleciConfig.from_json(path)
    path.write_bytes(b'{"d_model": "\xff"}')
    with pytest.raises(ValueError, match=r"config.json:1: not valid UTF-8"):
        ElleciConfig.from_json(path)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ElleciConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown ElleciConfig field"):
        ElleciConfig.from_name("tiny", d_modle=3)


def test_config_dict_round_trip():
    c = ElleciConfig.from_name("small")
    assert ElleciConfig.from_dict(c.to_dict()) == c


# ---- layers ----------------------------------------------------------------------------------

def test_rmsnorm_golden():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    # x = [3, 4]: rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    y = norm(torch.tensor([[3.0, 4.0]]))
    r = math.sqrt(12.5)
    torch.testing.assert_close(y, torch.tensor([[3 / r, 8 / r]]))


def test_rope_golden_and_relative():
    # head dim 2: inv_freq = [1], a pure rotation by the position angle
    cos, sin = rope_cos_sin(torch.tensor([[0, 1, 2]]), 2, 1e5)
    x = torch.tensor([1.0, 0.0]).expand(1, 1, 3, 2)
    y = apply_rope(x, cos, sin)[0, 0]
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [math.cos(2), math.sin(2)]]))
    # q·k depends only on the position difference; norms are preserved
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)

    def dot(m, n):
        cm, sm = rope_cos_sin(torch.tensor([[m]]), 8, 1e5)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), 8, 1e5)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()
    torch.testing.assert_close(dot(7, 3), dot(14, 10), rtol=1e-6, atol=1e-6)
    cm, sm = rope_cos_sin(torch.tensor([[5]]), 8, 1e5)
    torch.testing.assert_close(apply_rope(q, cm, sm).norm(), q.norm())


def test_bitlinear_weights_are_ternary_times_scale():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.02
    q, gamma = quantize_weights(w)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(gamma, w.abs().mean())
    # golden: W = [[0.1, -0.3], [0.02, 0.5]], γ = 0.23 -> W/γ = [0.43, -1.30, 0.087, 2.17] -> [0, -1, 0, 1]
    q, gamma = quantize_weights(torch.tensor([[0.1, -0.3], [0.02, 0.5]]))
    assert q.tolist() == [[0.0, -1.0], [0.0, 1.0]] and abs(gamma.item() - 0.23) < 1e-7


def test_bitlinear_activations_8bit_absmax():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
    q, s = quantize_activations(x)
    assert s.item() == 127.0                      # 127 / max|x| = 127
    assert q.tolist() == [[64.0, -127.0, 32.0, 0.0]]   # 63.5 rounds half-to-even to 64; 31.75 -> 32


def test_bitlinear_forward_equals_quantized_matmul_and_straight_through_grads():
    torch.manual_seed(0)
    layer = BitLinear(32, 8)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = layer(x)
    xn = layer.normalize(x.detach())
    qa, s = quantize_activations(xn)
    qw, g = quantize_weights(layer.weight.detach())
    torch.testing.assert_close(y, F.linear(qa / s, qw * g), rtol=1e-5, atol=1e-6)
    # STE: gradients are those of a plain linear layer evaluated at the quantised values
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(layer.weight.grad, (gy.reshape(-1, 8).T @ (qa / s).reshape(-1, 32)), rtol=1e-4, atol=1e-5)
    xr = x.detach().clone().requires_grad_(True)
    xn_r = layer.normalize(xr)                     # gradient flows through the internal norm only
    (xn_r * ((gy @ (qw * g)))).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)
