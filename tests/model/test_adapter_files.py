"""Adapter files (elleci.model.adapter_files): every tensor checked before anything is loaded (issue 18,
finding 5), and PEFT's layout both ways (issue 23, point 3), checked without installing PEFT."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from elleci.model import ElleciConfig, ElleciLM
from elleci.model.lora import LoraConfig, apply_lora, load_adapter, lora_modules, save_adapter

LINEAR_TARGETS = ["attn.w_q", "attn.w_kv_up", "attn.in_proj"]        # nn.Linear layers (no BitLinear)
# Fields of PEFT 0.21's LoraConfig (peft/tuners/lora/config.py) and its PeftConfig base: a file with any
# other key makes PeftConfig.from_peft_type warn that PEFT is outdated.
PEFT_FIELDS = {"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
               "peft_version", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
               "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
               "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core",
               "trainable_token_indices", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora",
               "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config",
               "layer_replication", "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config",
               "kasa_config", "ensure_weight_tying"}
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_(A|B)\.weight$")


def tiny(seed=0):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny")).eval()


def adapted(targets=LINEAR_TARGETS, seed=2, **kw):
    model = apply_lora(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def ids():
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))


def rewrite(d, change):
    """Apply `change(state) -> state` to a saved adapter's tensors and drop the manifest (a file edited by
    hand or written by another tool is what these checks are for)."""
    state = change(load_file(d / "adapter_model.safetensors"))
    save_file(state, d / "adapter_model.safetensors")
    (d / "manifest.json").unlink()
    return d


# ---- finding 5: every key, shape and dtype checked ------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 64), (64,), (4, 1), (5, 64)])
def test_mis_shaped_tensors_are_refused_not_broadcast(tmp_path, shape):
    d = save_adapter(adapted(), tmp_path / "ad")
    k = "base_model.model.blocks.1.attn.w_q.lora_A.weight"
    rewrite(d, lambda s: {**s, k: torch.ones(shape)})
    fresh = tiny()
    with pytest.raises(ValueError, match=r"blocks.1.attn.w_q: (lora_A \(.*\) and lora_B \(64, 4\) must be \[r, in\] "
                                         r"and \[out, r\] with r = 4|adapter was made for in=1, out=64)"):
        load_adapter(fresh, d)
    assert not lora_modules(fresh)                                   # nothing was applied


def test_extra_missing_and_integer_tensors_are_named(tmp_path):
    d = save_adapter(adapted(), tmp_path / "ad")
    ok = load_file(d / "adapter_model.safetensors")
    rewrite(d, lambda s: {**s, "base_model.model.blocks.1.attn.w_q.lora_C.weight": torch.zeros(2),
                          "junk": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys .*\['base_model.model.blocks.1.attn.w_q.lora_C.weight', "
                                         r"'junk'\]"):
        load_adapter(tiny(), d)
    k = "base_model.model.blocks.0.attn.in_proj.lora_B.weight"
    save_file({n: t for n, t in ok.items() if n != k}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing {re.escape(k)}"):
        load_adapter(tiny(), d)
    save_file({**ok, k: ok[k].to(torch.int64)}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{re.escape(k)} has dtype torch.int64, expected a floating-point tensor"):
        load_adapter(tiny(), d)


def test_an_adapted_model_with_other_scaling_is_refused(tmp_path):
    d = save_adapter(adapted(), tmp_path / "ad")
    other = apply_lora(tiny(), LoraConfig(r=4, lora_alpha=32, target_modules=LINEAR_TARGETS))
    with pytest.raises(ValueError, match="the model's adapter has r=4, lora_alpha=32.*the file r=4, lora_alpha=8"):
        load_adapter(other, d)
    with pytest.raises(ValueError, match="lora_alpha must be a number > 0, got nan"):
        LoraConfig(lora_alpha=math.nan)


def test_a_damaged_adapter_file_is_named(tmp_path):
    d = save_adapter(adapted(), tmp_path / "ad")
    data = bytearray((d / "adapter_model.safetensors").read_bytes())
    data[-3] ^= 1
    (d / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="adapter_model.safetensors does not match its SHA-256"):
        load_adapter(tiny(), d)


# ---- issue 23.3: PEFT's layout both ways ----------------------------------------------------------

def test_saved_files_have_exactly_what_peft_reads(tmp_path):
    model = adapted(layers_to_transform=[0, 1])
    d = save_adapter(model, tmp_path / "ad")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert set(cfg) <= PEFT_FIELDS, set(cfg) - PEFT_FIELDS
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] is None               # a plain PeftModel, any tree
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["bias"]) == (4, 8, False, "none")
    names = sorted(lora_modules(model))
    assert cfg["target_modules"] == names == ["blocks.0.attn.in_proj", "blocks.1.attn.w_kv_up", "blocks.1.attn.w_q"]
    assert cfg["layers_to_transform"] == [0, 1] and cfg["layers_pattern"] == "blocks"
    state = load_file(d / "adapter_model.safetensors")
    modules = dict(tiny().named_modules())
    assert sorted(state) == sorted(f"base_model.model.{n}.lora_{w}.weight" for n in names for w in "AB")
    for k, t in state.items():
        name, which = KEY.match(k).groups()
        layer = modules[name]                                                     # a module of the base tree
        assert tuple(t.shape) == ((4, layer.in_features) if which == "A" else (layer.out_features, 4))
        # PEFT's layer-index rule with layers_pattern (check_target_module_exists): the index it reads
        assert int(re.match(r"(?:^|.*?\.)blocks\.(?P<idx>\d+)\.", name + ".")["idx"]) in cfg["layers_to_transform"]
    back = load_adapter(tiny(), d)
    assert back.lora_config.layers_to_transform == [0, 1]                          # the pattern survives
    assert json.loads((save_adapter(back, tmp_path / "again") / "adapter_config.json").read_text()) == cfg


def peft_written(model, directory):
    """The two files PEFT 0.21's `save_pretrained` writes for this adapter (no manifest, no `modules`,
    task_type CAUSAL_LM, PEFT's own defaults), made by hand."""
    directory.mkdir()
    state = {f"base_model.model.{n}.lora_{w}.weight": getattr(m, f"lora_{w}").detach().clone()
             for n, m in lora_modules(model).items() for w in "AB"}
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None, "base_model_name_or_path": "elleci",
           "revision": None, "inference_mode": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
           "target_modules": ["w_q", "w_kv_up", "in_proj"], "exclude_modules": None, "fan_in_fan_out": False,
           "bias": "none", "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
           "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
           "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {}, "use_dora": False,
           "layer_replication": None, "runtime_config": {"ephemeral_gpu_offload": False}, "lora_bias": False,
           "target_parameters": None, "trainable_token_indices": None, "eva_config": None, "corda_config": None,
           "peft_version": "0.21.2"}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def test_an_adapter_written_by_peft_loads(tmp_path):
    model = adapted()
    want = model(ids())
    d = peft_written(model, tmp_path / "peft")
    fresh = tiny()
    load_adapter(fresh, d)                                                   # main: KeyError: 'modules'
    assert sorted(lora_modules(fresh)) == sorted(lora_modules(model))
    assert torch.equal(fresh(ids()), want)                                  # same model, same code path


def test_bitlinear_adapters_are_marked_and_plain_ones_refused_there(tmp_path):
    model = adapted(targets=["attn.w_q", "ffn.w1"])
    d = save_adapter(model, tmp_path / "ad")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ELLECI_BITLINEAR_LORA"                     # PEFT refuses an unknown peft_type
    assert cfg["elleci_bitlinear_modules"] == [f"blocks.{i}.ffn.w1" for i in range(4)]
    fresh = tiny()
    load_adapter(fresh, d)                                                   # elleci honours it
    assert torch.equal(fresh(ids()), model(ids()))
    plain = peft_written(model, tmp_path / "peft")                          # the same weights, PEFT's meaning
    with pytest.raises(ValueError, match=r"a plain \(PEFT\) LoRA adapter on \['blocks.0.ffn.w1'.*BitLinear layers here"):
        load_adapter(tiny(), plain)
    cfg = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True, "rank_pattern": {"w_q": 8}}))
    with pytest.raises(ValueError, match="PEFT features elleci does not implement: rank_pattern=.*use_dora=True"):
        load_adapter(tiny(), plain)
