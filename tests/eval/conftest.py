"""A small SentencePiece tokenizer and a tiny float64 Elleci for the evaluation tests (no downloads)."""
import os

import pytest
import torch

from elleci.model import ElleciConfig, ElleciLM, Tokenizer
from elleci.tasks import synthetic_corpus

# lm-eval / datasets must never reach the network in tests.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_tok")
    extra = ["Domanda: Qual è la capitale d'Italia? Risposta: Roma.", "Il gatto dorme sul divano. Città, perché, più."]
    (d / "t.txt").write_text("\n".join(synthetic_corpus(300, seed=0) + extra), encoding="utf-8")
    return Tokenizer.train(d / "t.txt", vocab_size=400)


def _make_model(tok, seed: int = 0, dtype=torch.float64) -> ElleciLM:
    torch.manual_seed(seed)
    return ElleciLM(ElleciConfig.from_name("tiny", vocab_size=tok.vocab_size)).to(dtype).eval()


@pytest.fixture(scope="session")
def make_model():
    """make_model(tok, seed=0, dtype=torch.float64): a tiny Elleci with the tokenizer's vocabulary, eval mode."""
    return _make_model


@pytest.fixture(scope="session")
def model(tok):
    return _make_model(tok)
