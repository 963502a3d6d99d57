"""Tests for elleci.model.tokenizer: SentencePiece training, the ChatML template, the original HF tokenizer."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from elleci.model.tokenizer import Tokenizer, _sample, render_chat

FIXTURE_JSON = Path(__file__).resolve().parents[2].parent / "shared/fixtures/original_elleci/tokenizer/tokenizer.json"
SPECIALS = {"<|endoftext|>": 0, "<|padding|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
ITALIAN = "Perché la città è già così bella? Però l'università è più lontana, disse Niccolò."
ENGLISH = "The quick brown fox jumps over the lazy dog, because it's fast."

IT_SUBJECTS = ["la città", "il gatto", "mia nonna", "l'università", "il caffè", "Niccolò", "la società"]
IT_VERBS = ["è", "sembra", "diventa", "era", "sarà"]
IT_ADJ = ["bella", "già pronta", "più grande", "così lontana", "perfetta", "felice"]
IT_TAILS = ["perché piove", "però non è vero", "ma va bene così", "e poi è andata via", "qualità e virtù"]
EN_SUBJECTS = ["the city", "my cat", "the university", "our coffee", "the old man", "a small dog"]
EN_VERBS = ["is", "seems", "became", "was", "will be"]
EN_ADJ = ["beautiful", "ready", "bigger", "far away", "perfect", "happy"]
EN_TAILS = ["because it rains", "but it is not true", "and that is fine", "so they left", "in the morning"]


def _sentence(rng: random.Random) -> str:
    """One random Italian or English sentence built from the word lists above."""
    if rng.random() < 0.5:
        parts = IT_SUBJECTS, IT_VERBS, IT_ADJ, IT_TAILS
    else:
        parts = EN_SUBJECTS, EN_VERBS, EN_ADJ, EN_TAILS
    words = [rng.choice(p) for p in parts]
    sentence = f"{words[0].capitalize()} {words[1]} {words[2]}, {words[3]}"
    return sentence + rng.choice([".", "!", "?", " (" + str(rng.randint(0, 2025)) + ")."])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_sentence(rng) for _ in range(4000)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp_tok(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, vocab_size=800)


# ----------------------------------------------------------------------------- SentencePiece

def test_trained_special_ids(sp_tok):
    assert sp_tok.kind == "sentencepiece"
    assert sp_tok.special_tokens == SPECIALS
    assert (sp_tok.eos_id, sp_tok.pad_id, sp_tok.im_start_id, sp_tok.im_end_id) == (0, 1, 2, 3)
    assert [sp_tok.id_to_token(i) for i in range(4)] == list(SPECIALS)
    assert sp_tok.vocab_size == 800
    assert sp_tok.token_to_id("<|im_end|>") == 3
    assert sp_tok.token_to_id("certainly not a piece") is None


@pytest.mark.parametrize("text", [ITALIAN, ENGLISH, "  spazi  doppi\te tab\n", "émoji 🙂 ünïcode", ""])
def test_sp_round_trip(sp_tok, text):
    ids = sp_tok.encode(text)
    assert all(0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.decode(ids) == text


def test_sp_corpus_characters_are_pieces(sp_tok):
    # character_coverage=1.0: every accented letter seen in training is a piece, not byte fallback
    pieces = [sp_tok.id_to_token(i) for i in sp_tok.encode("perché già città più però Niccolò")]
    assert not any(p.startswith("<0x") for p in pieces)
    # an unseen character falls back to its UTF-8 bytes
    assert [sp_tok.id_to_token(i) for i in sp_tok.encode("🙂")] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_sp_special_strings_encode_to_single_ids(sp_tok):
    for token, i in SPECIALS.items():
        assert sp_tok.encode(token) == [i]
    text = "<|im_start|>user\nCiao<|im_end|><|endoftext|>"
    ids = sp_tok.encode(text)
    assert ids[0] == 2 and ids[-2:] == [3, 0]
    assert sp_tok.decode(ids) == text
    assert sp_tok.decode(ids, skip_special_tokens=True) == "user\nCiao"


def test_sp_save_load(sp_tok, tmp_path):
    path = sp_tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.model"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.model"]  # no temp file left
    for source in (path.parent, path, str(path)):
        loaded = Tokenizer.load(source)
        assert loaded.encode(ITALIAN) == sp_tok.encode(ITALIAN)
        assert loaded.special_tokens == SPECIALS
    assert Tokenizer.from_file(path).encode(ENGLISH) == sp_tok.encode(ENGLISH)


def test_sp_training_is_deterministic(sp_tok, corpus, tmp_path):
    again = Tokenizer.train([corpus], vocab_size=800, out_dir=tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    assert [again.id_to_token(i) for i in range(again.vocab_size)] == [sp_tok.id_to_token(i) for i in range(800)]
    assert again.encode(ITALIAN + ENGLISH) == sp_tok.encode(ITALIAN + ENGLISH)


def test_sp_sampled_training_is_deterministic_across_processes(corpus, tmp_path):
    # SentencePiece's own input_sentence_size sample changes from process to process; ours must not
    code = ("import sys; from elleci.model.tokenizer import Tokenizer; "
            "Tokenizer.train(sys.argv[1], 800, sys.argv[2], input_sentence_size=1000, seed=3)")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "child")], check=True, env=env)
    here = Tokenizer.train(corpus, 800, tmp_path / "here", input_sentence_size=1000, seed=3)
    assert (tmp_path / "child/tokenizer.model").read_bytes() == (tmp_path / "here/tokenizer.model").read_bytes()
    assert here.special_tokens == SPECIALS


def test_sample_is_seeded_uniform_subset_in_order():
    lines = [f"line {i}" for i in range(1000)]
    a = _sample(iter(lines), 100, seed=0)
    assert len(a) == 100 and a == sorted(a, key=lines.index) and set(a) <= set(lines)
    assert a == _sample(iter(lines), 100, seed=0)
    assert a != _sample(iter(lines), 100, seed=1)
    assert _sample(iter(lines[:10]), 100, seed=0) == lines[:10]
    assert max(lines.index(x) for x in a) > 500  # not just the head of the file


def test_sp_unigram_without_byte_fallback_keeps_newlines(corpus):
    tok = Tokenizer.train(corpus, vocab_size=300, model_type="unigram", byte_fallback=False)
    assert tok.special_tokens == SPECIALS
    text = "<|im_start|>user\nLa città è bella<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text


def test_decode_rejects_out_of_range_ids(sp_tok):
    with pytest.raises(IndexError, match="800"):
        sp_tok.decode([5, 800])
    with pytest.raises(IndexError):
        sp_tok.id_to_token(-1)


# ----------------------------------------------------------------------------- chat template

def test_render_chat_golden_strings():
    user = [{"role": "user", "content": "U"}]
    pair = user + [{"role": "assistant", "content": "A"}]
    assert render_chat(user) == "<|im_start|>user\nU<|im_end|>"
    assert render_chat(user, add_generation_prompt=True) == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(pair) == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>"
    assert render_chat([], add_generation_prompt=True) == "<|im_start|>assistant\n"
    assert render_chat([]) == ""


def test_render_chat_folds_system_into_first_user():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert render_chat(messages, add_generation_prompt=True) == (
        "<|im_start|>user\nS\n\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, match", [
    ("hello", "list"),
    ([{"role": "user", "content": "U"}, "oops"], r"messages\[1\]"),
    ([{"role": "bot", "content": "U"}], r"messages\[0\].*'bot'"),
    ([{"role": "user"}], r"messages\[0\].*content"),
    ([{"role": "user", "content": 3}], r"messages\[0\].*str"),
    ([{"role": "user", "content": "U"}, {"role": "system", "content": "S"}], r"messages\[1\].*system"),
    ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}], r"messages\[1\].*user"),
    ([{"role": "system", "content": "S"}], "user"),
])
def test_render_chat_rejects_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


def test_apply_chat_template(sp_tok):
    messages = [{"role": "user", "content": "Perché?"}]
    text = sp_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nPerché?<|im_end|>\n<|im_start|>assistant\n"
    ids = sp_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == sp_tok.encode(text)
    assert ids.count(2) == 2 and ids.count(3) == 1


# ----------------------------------------------------------------------------- original HF tokenizer.json

HF_TEXTS = [
    "guardare", " questo", "guardare questo", ITALIAN, ENGLISH, "Ciao! Buongiorno, come stai?",
    "<|im_start|>user\nCiao, come stai?<|im_end|>\n<|im_start|>assistant\nBene, grazie!<|im_end|><|endoftext|>",
    "def f(x):\n    return x ** 2  # code", "",
]


@pytest.fixture(scope="module")
def hf_pair():
    tokenizers = pytest.importorskip("tokenizers")
    if not FIXTURE_JSON.is_file():
        pytest.skip(f"original tokenizer fixture not found at {FIXTURE_JSON}")
    return Tokenizer.load(FIXTURE_JSON), tokenizers.Tokenizer.from_file(str(FIXTURE_JSON))


@pytest.mark.parametrize("text", HF_TEXTS)
def test_hf_matches_reference(hf_pair, text):
    ours, reference = hf_pair
    ids = ours.encode(text)
    assert ids == reference.encode(text).ids
    assert ours.decode(ids) == text


def test_hf_vocab_and_specials(hf_pair, tmp_path):
    ours, _ = hf_pair
    assert ours.kind == "huggingface"
    assert ours.vocab_size == 32043
    assert ours.special_tokens == SPECIALS
    assert ours.encode("guardare") == [ours.token_to_id(t) for t in ("gu", "ar", "dare")]  # the spec's quirk
    assert [ours.id_to_token(i) for i in ours.encode(" questo")] == ["Ġ", "questo"]
    saved = Tokenizer.load(ours.save(tmp_path).parent)
    assert saved.kind == "huggingface" and saved.encode(ITALIAN) == ours.encode(ITALIAN)


# ----------------------------------------------------------------------------- errors

def test_load_dir_without_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


def test_load_unknown_suffix(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="vocab.txt"):
        Tokenizer.load(path)


def test_missing_special_token_is_named(corpus, tmp_path):
    import sentencepiece as spm
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=300, minloglevel=2)
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        Tokenizer.load(f"{prefix}.model")


def test_hf_load_without_tokenizers_package(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer.load(tmp_path)
