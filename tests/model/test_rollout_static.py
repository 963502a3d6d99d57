"""rollout(decoder="static"): the static-cache decoder under the rollout's micro-batches, sorting, sharing and
per-row seeds gives the tokens of the dynamic decoder (float64), whether the prefill is shared or not."""
import dataclasses

import pytest
import torch

from elleci.model import ElleciConfig, ElleciLM
from elleci.model.rollout import RolloutConfig, rollout

EOS = list(range(4, 60))           # a large stop set: an untrained model stops at random steps


def tiny(seed=0, pattern="MMMA"):
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", layer_pattern=pattern, mamba_input_gate=True,
                                           mla_latent_gate=True)).double().eval()


def prompts(lengths=(5, 12, 2, 9, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(200, 512, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("kv_mode", ["kv", "latent"])
def test_static_rollout_equals_the_dynamic_one_shared_or_not(temperature, kv_mode):
    model, ps, G = tiny(), prompts(), 3
    base = RolloutConfig(max_new_tokens=9, temperature=temperature, top_p=0.9, token_budget=60, check_every=2)
    want = rollout(model, ps, base, num_samples=G, eos_token_id=EOS, seed=7)
    assert want.stats["micro_batches"] > 2
    for share in (True, False):
        cfg = dataclasses.replace(base, decoder="static", kv_mode=kv_mode, share_prefill=share)
        got = rollout(model, ps, cfg, num_samples=G, eos_token_id=EOS, seed=7)
        assert got.completions == want.completions and got.stopped == want.stopped, share
        # shared: a prompt is prefilled once per micro-batch it has rows in; not shared: once per row
        assert got.stats["prefill_tokens"] == (want.stats["prefill_tokens"] if share else G * sum(map(len, ps)))
    if temperature > 0:
        assert 0 < sum(s for row in want.stopped for s in row) < len(ps) * G


def test_static_rollout_keeps_finished_rows_until_all_stop():
    """Fixed shapes: every row of a micro-batch runs until the first check where all have stopped."""
    model, ps, G = tiny(1, pattern="MAMA"), prompts(seed=2), 2
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0, check_every=12, decoder="static")
    out = rollout(model, ps, cfg, num_samples=G, eos_token_id=EOS, seed=5)
    assert out.stats["decoded_rows"] == len(ps) * G * 12


@pytest.mark.parametrize("bad", [dict(decoder="vllm"), dict(kv_mode="paged")])
def test_bad_decoder_settings_name_the_key(bad):
    with pytest.raises(ValueError, match=f"rollout.{next(iter(bad))}"):
        RolloutConfig(**bad)
