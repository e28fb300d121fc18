"""Input records: JSONL objects (one per line, text under ``json_key``) or plain text.

Plain text is cut into documents by ``text_doc``: ``line`` (each non-blank line), ``paragraph``
(blocks between blank lines) or ``file`` (the whole file). Reading (bytes, line numbers) is split
from parsing (UTF-8, JSON) so parsing can run in worker processes and still name the file and line
of a bad record.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

from megallama.errors import UserError

FORMATS = ("auto", "jsonl", "text")
TEXT_DOCS = ("line", "paragraph", "file")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BOM = b"\xef\xbb\xbf"

RawRecord = Tuple[int, int, bytes]  # (input index, first line number, raw bytes)


@dataclass(frozen=True)
class InputSpec:
    paths: Tuple[str, ...]
    fmt: str = "auto"  # auto: .jsonl/.json/.ndjson are JSONL, anything else text
    json_key: str = "text"
    text_doc: str = "line"
    skip_empty: bool = False

    def format_of(self, i: int) -> str:
        if self.fmt != "auto":
            return self.fmt
        return "jsonl" if self.paths[i].lower().endswith(JSONL_SUFFIXES) else "text"

    def check(self) -> None:
        if not self.paths:
            raise UserError("--input: no input files given")
        for path in self.paths:
            if not os.path.isfile(path):
                raise UserError(f"{path}: input file not found")


def iter_raw(spec: InputSpec, i: int) -> Iterator[Tuple[int, bytes, int]]:
    """(line number, raw record, bytes consumed) for input ``i``; blank lines are not records."""
    fmt, path = spec.format_of(i), spec.paths[i]
    with open(path, "rb") as fh:
        if fmt == "text" and spec.text_doc == "file":
            data = fh.read()
            yield 1, data[3:] if data.startswith(BOM) else data, len(data)
            return
        para: List[bytes] = []
        start = used = 0
        for n, line in enumerate(fh, 1):
            if n == 1 and line.startswith(BOM):
                line = line[3:]
            used += len(line)
            blank = not line.strip()
            if fmt == "text" and spec.text_doc == "paragraph":
                if blank:
                    if para:
                        yield start, b"".join(para).rstrip(b"\r\n"), used
                        para, used = [], 0
                    continue
                if not para:
                    start = n
                para.append(line)
                continue
            if not blank:
                yield n, line.rstrip(b"\r\n") if fmt == "text" else line, used
                used = 0
        if para:
            yield start, b"".join(para).rstrip(b"\r\n"), used


def parse(spec: InputSpec, i: int, line_no: int, raw: bytes) -> Optional[str]:
    """The text of one record; None for an empty one that ``skip_empty`` allows to drop."""
    path = spec.paths[i]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = line_no + raw[:exc.start].count(b"\n")
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {col})") from None
    if spec.format_of(i) == "jsonl":
        text = _json_text(spec, path, line_no, text)
    if not text.strip():
        if spec.skip_empty:
            return None
        what = "document" if spec.format_of(i) == "text" else f"'{spec.json_key}'"
        raise UserError(f"{path}:{line_no}: empty {what}; remove it or pass --skip-empty")
    return text


def _json_text(spec: InputSpec, path: str, line_no: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    if spec.json_key not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        raise UserError(f"{path}:{line_no}: no key '{spec.json_key}' (keys: {keys}); choose one with --json-key")
    value = obj[spec.json_key]
    if not isinstance(value, str):
        raise UserError(f"{path}:{line_no}: '{spec.json_key}' is {type(value).__name__}, expected a string")
    return value


def iter_texts(spec: InputSpec) -> Iterator[str]:
    """Every document's text, in order, parsed in this process (tokenizer training)."""
    for i in range(len(spec.paths)):
        for line_no, raw, _ in iter_raw(spec, i):
            text = parse(spec, i, line_no, raw)
            if text is not None:
                yield text


def batches(spec: InputSpec, max_bytes: int = 1 << 18, max_records: int = 512
            ) -> Iterator[Tuple[List[RawRecord], int]]:
    """Raw records grouped for workers, with the input bytes each group consumed."""
    batch: List[RawRecord] = []
    size = used = 0
    for i in range(len(spec.paths)):
        for line_no, raw, n in iter_raw(spec, i):
            batch.append((i, line_no, raw))
            size += len(raw)
            used += n
            if size >= max_bytes or len(batch) >= max_records:
                yield batch, used
                batch, size, used = [], 0, 0
    if batch or used:
        yield batch, used


def total_bytes(paths: Sequence[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)
