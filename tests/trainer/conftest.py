"""Fixtures shared by the multi-process trainer tests."""
import pytest

from elleci.model import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"ciao {a} mondo {b} hello world {a + b} risposta" for a in range(10) for b in range(10)]
    (d / "t.txt").write_text("\n".join(lines))
    Tokenizer.train(d / "t.txt", vocab_size=300).save(d / "tok")
    return d / "tok"
