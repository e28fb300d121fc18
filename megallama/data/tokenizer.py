"""Tokenizers: one interface over SentencePiece models (LLaMA 1/2), Meta's tiktoken-format
``tokenizer.model`` (Llama 3) and Hugging Face ``tokenizer.json`` files, told apart by content;
and training a SentencePiece model LLaMA's way.

Ids follow Meta's ``Tokenizer``: ``encode(s, bos, eos)`` adds BOS/EOS only when asked, ``pad_id``
is whatever the file says (-1 for LLaMA: no padding token). The end-of-document token written
after every document is EOS. No kind of file runs code when loaded (protobuf, text, JSON).
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from megallama.data.files import refuse_existing, remove_quietly, temp_name, write_bytes_atomic
from megallama.errors import UserError

# LLaMA's trainer_spec, as stored in its tokenizer.model (vocab_size aside).
LLAMA_TRAINER_SPEC = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
    split_by_unicode_script=True, split_by_whitespace=True, max_sentencepiece_length=16,
    character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ",
)
MAX_LINE_CHARS = 4000  # SentencePiece skips longer training sentences; we cut them instead


class Tokenizer:
    """A tokenizer file with Meta's conventions: ``encode(text, bos, eos)`` adds BOS/EOS only when
    asked, ``pad_id`` is -1 when there is no padding token, and the end-of-document token written
    after every document is EOS.

    ``Tokenizer(path)`` reads the file's kind from its content and returns the matching subclass
    (as ``pathlib.Path`` does), so every caller gets SentencePiece, tiktoken-format and
    ``tokenizer.json`` files alike. Special-token strings inside the text are encoded as ordinary
    text by every kind (as SentencePiece and Meta's tiktoken ``encode`` do): data cannot inject
    control tokens. Instances pickle as (path, file bytes), for preprocessing workers.
    """

    FILE_NAME = "tokenizer.model"  # the name a checkpoint directory gives this kind of file

    def __new__(cls, path=None):
        if cls is Tokenizer and path is not None:
            cls = tokenizer_class(path)
        return super().__new__(cls)

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path}: tokenizer model not found") from None
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read tokenizer model ({exc.strerror})") from None
        self._setup(data)

    def __getstate__(self):
        return {"path": self.path, "data": self.data}

    def __setstate__(self, state):
        self.path = state["path"]
        self._setup(state["data"])

    def _setup(self, data: bytes) -> None:
        """Parse the file's bytes; set ``data`` and the kind's own fields."""
        raise NotImplementedError

    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of a vocabulary entry, None when there is none."""
        raise NotImplementedError

    def piece(self, i: int) -> Optional[str]:
        """The vocabulary entry of id ``i`` (None for -1: a token the file does not have)."""
        raise NotImplementedError

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    @property
    def eod_id(self) -> int:
        """The end-of-document token appended after every document: EOS (``</s>`` for LLaMA)."""
        if self.eos_id < 0:
            raise UserError(f"{self.path}: the model has no end-of-sentence token (eos_id = -1); "
                            "one is needed to mark document ends")
        return self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self._encode(text)
        if bos and self.bos_id < 0:
            raise UserError(f"{self.path}: the model has no beginning-of-sentence token (bos_id = -1)")
        return ([self.bos_id] if bos else []) + ids + ([self.eod_id] if eos else [])

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """Each text's ids (no BOS/EOS), on one core."""
        return [self._encode(t) for t in texts]

    def check_vocab(self, expected: int, what: str = "model.vocab_size") -> None:
        if self.vocab_size != expected:
            raise UserError(f"{self.path}: tokenizer has {self.vocab_size} tokens but {what} is {expected}; "
                            "they must match")


EXPECTED_KINDS = ("expected a SentencePiece model (protobuf), a tiktoken-format file (lines of base64 token and "
                  "rank) or a Hugging Face tokenizer.json")


def tokenizer_class(path) -> type:
    """The :class:`Tokenizer` subclass for the file at ``path``, from its first bytes: a
    ``tokenizer.json`` is a JSON object, a tiktoken file a line of base64 and a rank, anything
    else is given to SentencePiece (a protobuf has no such prefix)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return SentencePieceTokenizer  # its __init__ words the error
    if head.lstrip()[:1] == b"{":
        from megallama.data.bpe_tokenizer import TokenizerJson

        return TokenizerJson
    if re.match(rb"[A-Za-z0-9+/]+={0,2} \d+(\r?\n|$)", head):
        from megallama.data.bpe_tokenizer import TiktokenTokenizer

        return TiktokenTokenizer
    return SentencePieceTokenizer


def find_tokenizer(directory) -> Optional[Path]:
    """A checkpoint directory's tokenizer file (``tokenizer.model`` or ``tokenizer.json``), if any."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA 1/2's ``tokenizer.model``); a protobuf, so loading runs no code."""

    def _setup(self, data: bytes) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, TypeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a piece
            raise UserError(f"{self.path}: not a SentencePiece model ({_first_line(exc)}); {EXPECTED_KINDS}") \
                from None
        if self.sp.vocab_size() <= 0:
            raise UserError(f"{self.path}: not a SentencePiece model (empty vocabulary); {EXPECTED_KINDS}")
        self.data = data

    @property
    def proto(self) -> bytes:
        return self.data

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def _encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self.sp.encode(texts, num_threads=1) if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.sp.id_to_piece(i) else i

    def piece(self, i: int) -> Optional[str]:
        return self.sp.id_to_piece(i) if i >= 0 else None


def _first_line(exc: BaseException) -> str:
    """SentencePiece's message without its C++ source location."""
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    msg = re.sub(r"^INTERNAL:\s*", "", msg)
    return re.sub(r"^\S+\.cc\(\d+\)\s*(\[.*?\]\s*)?", "", msg).strip() or "unreadable protobuf"


def train_tokenizer(texts: Iterable[str], output: str, vocab_size: int, *, overwrite: bool = False,
                    max_sentences: int = 2_000_000, seed: int = 0, num_threads: Optional[int] = None,
                    character_coverage: Optional[float] = None) -> "SentencePieceTokenizer":
    """Train a BPE model the LLaMA way from ``texts`` (each a document) and write ``output``.

    Documents are cut into lines (SentencePiece's "sentences"); at most ``max_sentences`` lines,
    sampled with a fixed seed, are used. The model appears under ``output`` only when complete.
    """
    import sentencepiece as spm

    refuse_existing([output], overwrite)
    lines_path = temp_name(Path(output).with_suffix(".lines"))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    n_lines = 0
    try:
        with open(lines_path, "w", encoding="utf-8") as fh:
            for text in texts:
                for line in text.splitlines():
                    for i in range(0, len(line), MAX_LINE_CHARS):
                        piece = line[i:i + MAX_LINE_CHARS]
                        if piece.strip():
                            fh.write(piece + "\n")
                            n_lines += 1
        if n_lines == 0:
            raise UserError(f"{output}: no text to train a tokenizer on (all inputs are empty)")
        spec = dict(LLAMA_TRAINER_SPEC)
        if character_coverage is not None:
            spec["character_coverage"] = character_coverage
        spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        try:
            with open(lines_path, encoding="utf-8") as lines:  # an iterator keeps our temp path out of the model
                spm.SentencePieceTrainer.train(
                    sentence_iterator=(line.rstrip("\n") for line in lines), model_writer=model, vocab_size=vocab_size,
                    input_sentence_size=max_sentences, shuffle_input_sentence=True,
                    max_sentence_length=4 * MAX_LINE_CHARS + 16, num_threads=num_threads or os.cpu_count() or 1,
                    minloglevel=2, **spec)
        except RuntimeError as exc:
            msg = _first_line(exc)
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise UserError(f"{output}: cannot train a {vocab_size}-token tokenizer on this text ({msg})") \
                    from None
            raise UserError(f"{output}: tokenizer training failed ({msg})") from None
        write_bytes_atomic(output, model.getvalue())
    finally:
        remove_quietly(lines_path)
    return SentencePieceTokenizer(output)
