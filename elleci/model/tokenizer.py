r"""Tokenizer for elleci: one `Tokenizer` class over two backends, plus the ChatML chat template.

Backends
- SentencePiece (`tokenizer.model`): what `Tokenizer.train` produces from plain-text files.
- Hugging Face `tokenizers` JSON (`tokenizer.json`): the original Elleci tokenizer (byte-level BPE,
  32,043 ids). Needs the optional `tokenizers` package (`pip install elleci[hf]`), imported only when
  such a file is loaded.

Through this class both behave alike: `encode` adds no BOS/EOS, special-token strings in the text
(e.g. "<|im_start|>") become their single id, and `decode` keeps them unless asked not to.

Special tokens (ids as in the original):
    0 <|endoftext|>   end of document (`eos_id`)
    1 <|padding|>     padding (`pad_id`)
    2 <|im_start|>    start of a chat turn
    3 <|im_end|>      end of a chat turn

Chat format (ChatML with no system turn; `render_chat`):
    <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>
A generation prompt is "<|im_start|>assistant\n". A leading system message is folded into the
first user message as system + "\n\n" + user, the convention the original used for OpenOrca.

Quirks of the original worth knowing (spec §5):
- The original tokenizer.json adds Italian words (`ciao`, `dare`, `questo`, ...) as non-special added
  tokens, which match anywhere, even inside words ("guardare" -> gu|ar|dare) and split off the
  preceding space as a lone "Ġ" (" questo" -> Ġ|questo). We reproduce this exactly; do not "fix" it
  when working with the original checkpoint.
- Its config files say eos=<|im_end|>, but every original training script used pad = eos =
  <|endoftext|> (id 0), appended after each document's final <|im_end|>.

SentencePiece notes: the four special tokens are trained as *user-defined* pieces, not as SentencePiece's
control eos/pad (control pieces are never produced from text and decode to ""). So a raw
`SentencePieceProcessor` on our model reports eos_id() == pad_id() == -1; use this class's properties.
BOS is disabled and <unk> is id 4. Text is not normalised and no dummy prefix space is added, so
`decode(encode(text)) == text` for any text when byte_fallback is on.
"""
from __future__ import annotations

import io
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from elleci._io import atomic_path, read_lines

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)  # ids 0, 1, 2, 3

SP_FILENAME = "tokenizer.model"
HF_FILENAME = "tokenizer.json"
CHAT_ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- chat template

def check_messages(messages: Sequence[Mapping]) -> None:
    """Raise ValueError, naming the index, unless `messages` is a valid list of chat turns."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] content must be a str, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one")
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("messages[0] is a system message, so messages[1] must be a user message")


def _fold_system(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(role, content) turns, with a leading system message merged into the first user turn."""
    turns = [(m["role"], m["content"]) for m in messages]
    if turns and turns[0][0] == "system":
        system, (_, user) = turns[0][1], turns[1]
        turns = [("user", system + "\n\n" + user)] + turns[2:]
    return turns


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """Render chat messages as the original's ChatML string.

    Each turn is "<|im_start|>{role}\\n{content}<|im_end|>" and turns are joined by "\\n"; with
    `add_generation_prompt` the string ends with "<|im_start|>assistant\\n" (after a "\\n" separator
    when there are earlier turns). A system message may only come first and is folded into the
    following user message as system + "\\n\\n" + user. Roles are not otherwise forced to alternate.

        render_chat([{"role": "user", "content": "U"}], add_generation_prompt=True)
        == "<|im_start|>user\\nU<|im_end|>\\n<|im_start|>assistant\\n"
    """
    check_messages(messages)
    parts = [f"{IM_START_TOKEN}{role}\n{content}{IM_END_TOKEN}" for role, content in _fold_system(messages)]
    if add_generation_prompt:
        parts.append(f"{IM_START_TOKEN}assistant\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- backends

class _SentencePieceBackend:
    """Adapter over a serialized SentencePiece model."""

    filename = SP_FILENAME
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    def size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces come back as the <unk> id
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def save(self, path: str) -> None:
        Path(path).write_bytes(self.model_proto)


class _HFBackend:
    """Adapter over a Hugging Face `tokenizers.Tokenizer` (the original tokenizer.json)."""

    filename = HF_FILENAME
    kind = "huggingface"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def from_file(cls, path: Path) -> _HFBackend:
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"loading {path} needs the optional Hugging Face `tokenizers` package: "
                              "pip install tokenizers (or pip install elleci[hf])") from e
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def save(self, path: str) -> None:
        self.tok.save(str(path))


def _special_token_ids(backend) -> dict[str, int]:
    """Map each special token to its id; raise ValueError if one is missing or not a single piece."""
    ids = {}
    for token in SPECIAL_TOKENS:
        i = backend.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no special token {token!r}; elleci needs {list(SPECIAL_TOKENS)}")
        if backend.encode(token) != [i]:
            raise ValueError(f"special token {token!r} (id {i}) does not encode from text to its single id")
        ids[token] = i
    return ids


def _resolve_file(path: Path) -> Path:
    """The tokenizer file named by `path`: the file itself, or tokenizer.model / tokenizer.json in a dir."""
    if path.is_dir():
        for name in (SP_FILENAME, HF_FILENAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {SP_FILENAME} or {HF_FILENAME} in directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.suffix not in (".model", ".json"):
        raise ValueError(f"cannot tell the tokenizer type of {path}: expected a .model or .json file")
    return path


# ----------------------------------------------------------------------------- training

def sentencepiece_trainer_options(vocab_size: int, *, model_type: str = "bpe", character_coverage: float = 1.0,
                                  byte_fallback: bool = True, max_sentence_length: int = 16384,
                                  num_threads: int = 16, verbose: bool = False, split_digits: bool = False) -> dict:
    """SentencePieceTrainer keyword options giving elleci's special ids 0..3, <unk> at 4, no BOS.

    `split_digits` makes every digit its own piece (one form per digit: what small arithmetic models need).

    Without byte fallback "\\n" is added as a user-defined piece: training reads one line at a time,
    so it never sees a newline, and ChatML needs one.
    """
    user_defined = list(SPECIAL_TOKENS) + ([] if byte_fallback else ["\n"])
    return dict(
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, max_sentence_length=max_sentence_length, num_threads=num_threads,
        user_defined_symbols=user_defined, unk_id=len(SPECIAL_TOKENS), bos_id=-1, eos_id=-1, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=split_digits, minloglevel=0 if verbose else 2,
    )


def _read_lines(paths: list[Path]) -> Iterator[str]:
    """Yield every non-empty line of the files, without its line ending."""
    for path in paths:
        for _, line in read_lines(path):                       # decoding errors name the file and line
            if line:
                yield line


def _sample(lines: Iterator[str], k: int, seed: int) -> list[str]:
    """A uniform random sample of `k` lines, in file order (reservoir sampling, seeded).

    Done here rather than by SentencePiece (input_sentence_size), whose sample differs from run to
    run even after set_random_generator_seed (sentencepiece 0.2.3).
    """
    rng, reservoir = random.Random(seed), []
    for n, line in enumerate(lines):
        if n < k:
            reservoir.append((n, line))
        elif (j := rng.randrange(n + 1)) < k:
            reservoir[j] = (n, line)
    return [line for _, line in sorted(reservoir)]


def _as_paths(text_files) -> list[Path]:
    """A list of existing file paths from one path or an iterable of paths."""
    paths = [Path(text_files)] if isinstance(text_files, (str, Path)) else [Path(p) for p in text_files]
    if not paths:
        raise ValueError("no text files given to train on")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"training text file not found: {path}")
    return paths


# ----------------------------------------------------------------------------- the class

class Tokenizer:
    """Text <-> token ids for elleci, over a SentencePiece or a Hugging Face tokenizer.

    Build one with `Tokenizer.load(path)` or `Tokenizer.train(files, vocab_size)`.
    """

    def __init__(self, backend):
        self._backend = backend
        self._size = backend.size()
        self._special = _special_token_ids(backend)

    # --- construction and storage

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding tokenizer.model or tokenizer.json (in that order), or such a file."""
        path = _resolve_file(Path(path))
        if path.suffix == ".json":
            return cls(_HFBackend.from_file(path))
        return cls(_SentencePieceBackend(path.read_bytes()))

    from_file = load

    @classmethod
    def train(cls, text_files, vocab_size: int, out_dir: str | Path | None = None, *, model_type: str = "bpe",
              character_coverage: float = 1.0, byte_fallback: bool = True, seed: int = 0,
              max_sentence_length: int = 16384, input_sentence_size: int = 0, num_threads: int = 16,
              verbose: bool = False, split_digits: bool = False) -> Tokenizer:
        """Train a SentencePiece tokenizer on UTF-8 text files (each non-empty line is one sentence).

        Args:
            text_files: a path or an iterable of paths.
            vocab_size: total number of ids, special tokens, <unk> and (with byte fallback) 256 bytes included.
            out_dir: if given, tokenizer.model is saved there.
            model_type: "bpe" (default, like the original) or "unigram".
            max_sentence_length: longer lines (in bytes) are skipped by SentencePiece.
            input_sentence_size: if > 0, train on a random sample of this many lines (drawn with `seed`).
            verbose: let SentencePiece log its progress to stderr.
            split_digits: every digit its own piece (for arithmetic tasks).
        Training is in memory and deterministic for fixed inputs and arguments.
        """
        options = sentencepiece_trainer_options(
            vocab_size, model_type=model_type, character_coverage=character_coverage, byte_fallback=byte_fallback,
            max_sentence_length=max_sentence_length, num_threads=num_threads, verbose=verbose,
            split_digits=split_digits)
        lines = _read_lines(_as_paths(text_files))
        if input_sentence_size > 0:
            lines = iter(_sample(lines, input_sentence_size, seed))
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **options)
        tokenizer = cls(_SentencePieceBackend(model.getvalue()))
        if out_dir is not None:
            tokenizer.save(out_dir)
        return tokenizer

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face) into `directory`, atomically."""
        target = Path(directory) / self._backend.filename
        with atomic_path(target) as tmp:
            self._backend.save(tmp)
        return target

    # --- vocabulary

    @property
    def kind(self) -> str:
        """The backend: "sentencepiece" or "huggingface"."""
        return self._backend.kind

    @property
    def vocab_size(self) -> int:
        """Number of ids (32,043 for the original; the model may pad its embedding beyond this)."""
        return self._size

    def token_to_id(self, token: str) -> int | None:
        """The id of a backend-native token string (e.g. "▁casa", "Ġcasa", "<|im_end|>"), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        """The backend-native token string of id `i`; IndexError when out of range."""
        return self._backend.id_to_token(self._check_id(int(i)))

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id: {"<|endoftext|>": 0, "<|padding|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}."""
        return dict(self._special)

    eos_id = property(lambda self: self._special[EOS_TOKEN], doc="Id of <|endoftext|> (0).")
    pad_id = property(lambda self: self._special[PAD_TOKEN], doc="Id of <|padding|> (1).")
    im_start_id = property(lambda self: self._special[IM_START_TOKEN], doc="Id of <|im_start|> (2).")
    im_end_id = property(lambda self: self._special[IM_END_TOKEN], doc="Id of <|im_end|> (3).")

    # --- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added, special-token strings become their single id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D tensor); IndexError for ids outside [0, vocab_size)."""
        ids = [self._check_id(int(i)) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special_tokens:
            special = set(self._special.values())
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """`render_chat(messages, add_generation_prompt)`, encoded to ids unless `tokenize` is False."""
        text = render_chat(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def _check_id(self, i: int) -> int:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is out of range for a vocabulary of {self.vocab_size} ids")
        return i

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
