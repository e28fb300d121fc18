"""SentencePiece tokenizer: load any ``tokenizer.model`` (LLaMA's included), train one LLaMA's way.

Ids follow Meta's ``Tokenizer``: ``encode(s, bos, eos)`` adds ``<s>``/``</s>`` only when asked,
``pad_id`` is whatever the model says (-1 for LLaMA: no padding token). The end-of-document token
written after every document is ``</s>``. A model file is a protobuf, so loading an untrusted one
runs no code.
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
    """A loaded SentencePiece model with LLaMA's bos/eos/pad conventions."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = os.fspath(path)
        try:
            proto = Path(self.path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path}: tokenizer model not found") from None
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read tokenizer model ({exc.strerror})") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a piece
            raise UserError(f"{self.path}: not a SentencePiece model ({_first_line(exc)})") from None
        if self.sp.vocab_size() <= 0:
            raise UserError(f"{self.path}: not a SentencePiece model (empty vocabulary)")
        self.proto = proto

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

    @property
    def eod_id(self) -> int:
        """The end-of-document token appended after every document: ``</s>``."""
        if self.eos_id < 0:
            raise UserError(f"{self.path}: the model has no end-of-sentence token (eos_id = -1); "
                            "one is needed to mark document ends")
        return self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        if bos and self.bos_id < 0:
            raise UserError(f"{self.path}: the model has no beginning-of-sentence token (bos_id = -1)")
        return ([self.bos_id] if bos else []) + ids + ([self.eod_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def check_vocab(self, expected: int, what: str = "model.vocab_size") -> None:
        if self.vocab_size != expected:
            raise UserError(f"{self.path}: tokenizer has {self.vocab_size} tokens but {what} is {expected}; "
                            "they must match")


def _first_line(exc: BaseException) -> str:
    """SentencePiece's message without its C++ source location."""
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    msg = re.sub(r"^INTERNAL:\s*", "", msg)
    return re.sub(r"^\S+\.cc\(\d+\)\s*(\[.*?\]\s*)?", "", msg).strip() or "unreadable protobuf"


def train_tokenizer(texts: Iterable[str], output: str, vocab_size: int, *, overwrite: bool = False,
                    max_sentences: int = 2_000_000, seed: int = 0, num_threads: Optional[int] = None,
                    character_coverage: Optional[float] = None) -> Tokenizer:
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
    return Tokenizer(output)
