"""elleci adapters in PEFT and PEFT adapters in elleci, with PEFT itself (skipped where PEFT is not installed;
tests/model/test_adapter_files.py checks the same files field by field without it). Measured with PEFT 0.21.2."""
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from elleci.model import ElleciConfig, ElleciLM  # noqa: E402
from elleci.model.lora import LoraConfig, apply_lora, load_adapter, lora_modules, save_adapter  # noqa: E402


def tiny():
    torch.manual_seed(0)
    return ElleciLM(ElleciConfig.from_name("tiny")).eval()


def adapted(targets, **kw):
    model = apply_lora(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def test_peft_loads_an_elleci_adapter_and_elleci_loads_what_peft_writes(tmp_path):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    ours = adapted(["attn.w_q", "attn.w_kv_up", "attn.in_proj", "attn.out_proj"], layers_to_transform=[0, 1, 2])
    save_adapter(ours, tmp_path / "elleci")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                 # no "unexpected keyword" warning from PEFT
        pm = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "elleci")).eval()
    assert type(pm) is peft.PeftModel
    names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer))
    assert names == sorted(lora_modules(ours))
    with torch.no_grad():
        want, got, base = ours(ids), pm(ids), tiny()(ids)
    assert (want - base).abs().max() > 0.1                          # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)     # two implementations of h = Wx + sBAx

    pm.save_pretrained(str(tmp_path / "peft"))
    assert "modules" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    back = load_adapter(tiny(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), got, rtol=1e-5, atol=1e-5)


def test_peft_refuses_an_adapter_on_bitlinear_layers(tmp_path):
    save_adapter(adapted(["attn.w_q", "ffn.w1"]), tmp_path / "bit")
    with pytest.raises(KeyError, match="ELLECI_BITLINEAR_LORA"):
        peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "bit"))
