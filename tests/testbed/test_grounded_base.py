"""The cached grounded-QA base: built once per settings and seed, then loaded with the same weights."""
from dataclasses import replace

import torch

from elleci.tasks import grounded_qa
from elleci.testbed.grounded_base import QUICK_BASE, GroundedBaseConfig, cache_directory, cached_grounded_base


def test_builds_once_then_loads_the_same_model_and_keys_on_every_setting(tmp_path):
    cfg = GroundedBaseConfig(**QUICK_BASE)
    train = grounded_qa.make_items(cfg.n_train, seed=0, people=cfg.people)
    said = []
    built, tok = cached_grounded_base(cfg, 0, train, tmp_path, print_fn=said.append)
    loaded, tok2 = cached_grounded_base(cfg, 0, train, tmp_path, print_fn=said.append)
    assert said[-1].startswith("base: loaded from") and tok2.vocab_size == tok.vocab_size
    ids = torch.tensor([tok.encode("Passage:")])
    torch.testing.assert_close(loaded.eval()(ids), built.eval()(ids), rtol=0, atol=0)
    directories = {cache_directory(c, s, tmp_path) for c, s in
                   [(cfg, 0), (cfg, 1), (replace(cfg, pretrain_lr=1e-3), 0), (replace(cfg, layout="MA"), 0)]}
    assert len(directories) == 4                               # seed and every setting key the cache
    assert cache_directory(cfg, 0, None) is None and cache_directory(cfg, 0, "") is None
