"""Input records: JSONL objects (one per line, text under ``json_key``), plain text, or table rows.

Plain text is cut into documents by ``text_doc``: ``line`` (each non-blank line), ``paragraph``
(blocks between blank lines) or ``file`` (the whole file). Table rows (parquet, arrow, a
``datasets`` directory: :mod:`megallama.data.sources`) arrive as dicts and take the JSONL path
from the parsed object on. Reading (bytes, line numbers) is split from parsing (UTF-8, JSON,
filters) so parsing can run in worker processes and still name the file and line of a bad record.
"""
from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

from megallama.data import sources
from megallama.data.filters import RecordFilter
from megallama.errors import UserError

TEXT_DOCS = ("line", "paragraph", "file")
BOM = b"\xef\xbb\xbf"

RawRecord = Tuple[int, int, Union[bytes, dict]]  # (input index, first line or row number, raw bytes or row)


class Drop(enum.Enum):
    """Why a record made no document."""

    EMPTY = "empty"  # blank text, with skip_empty
    FILTERED = "filtered"  # refused by the RecordFilter


@dataclass(frozen=True)
class InputSpec:
    paths: Tuple[str, ...]
    fmt: str = "auto"  # see sources.format_of
    json_key: str = "text"
    text_doc: str = "line"
    skip_empty: bool = False
    filter: RecordFilter = RecordFilter()

    def format_of(self, i: int) -> str:
        return _formats(self)[i]

    def check(self) -> None:
        if not self.paths:
            raise UserError("--input: no input files given")
        if self.paths.count(sources.STDIN) > 1:
            raise UserError("--input: '-' (standard input) given more than once")
        for i, path in enumerate(self.paths):
            sources.check(path, self.fmt)
            if self.filter.equals and self.format_of(i) == "text":
                raise UserError(f"{path}: --filter needs records with fields (JSONL, parquet, arrow, datasets), "
                                "not plain text")


@functools.lru_cache(maxsize=16)
def _formats(spec: InputSpec) -> Tuple[str, ...]:
    """Each input's format, found once (workers ask per record; a name may need a ``stat``)."""
    return tuple(sources.format_of(p, spec.fmt) for p in spec.paths)


def iter_raw(spec: InputSpec, i: int) -> Iterator[Tuple[int, Union[bytes, dict], int]]:
    """(line or row number, raw record, source bytes consumed) for input ``i``; blank lines are
    not records."""
    fmt = spec.format_of(i)
    if fmt in sources.TABLE_FORMATS:
        columns = tuple(dict.fromkeys((spec.json_key,) + spec.filter.fields))
        yield from sources.iter_rows(spec.paths[i], fmt, spec.json_key, columns)
    else:
        yield from _iter_lines(spec, i, fmt)


def _iter_lines(spec: InputSpec, i: int, fmt: str) -> Iterator[Tuple[int, bytes, int]]:
    with sources.open_lines(spec.paths[i]) as (fh, position):
        if fmt == "text" and spec.text_doc == "file":
            data = fh.read()
            yield 1, data[3:] if data.startswith(BOM) else data, position() if position else len(data)
            return
        para: List[bytes] = []
        start = used = seen = 0
        for n, line in enumerate(fh, 1):
            if n == 1 and line.startswith(BOM):
                line = line[3:]
            if position is None:
                used += len(line)
            else:  # the compressed file's position: what the progress total counts
                now = position()
                used, seen = used + now - seen, now
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


def parse(spec: InputSpec, i: int, line_no: int, raw: Union[bytes, dict]) -> Union[str, Drop]:
    """The text of one record, or why it makes no document (only where the spec allows dropping it)."""
    path = sources.display(spec.paths[i])
    if isinstance(raw, dict):  # a table row, already typed
        where, fmt = f"{path} row {line_no}", "table"
        record: Optional[dict] = raw
    else:
        where, fmt = f"{path}:{line_no}", spec.format_of(i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = line_no + raw[:exc.start].count(b"\n")
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise UserError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {col})") from None
        record = _json_object(where, text) if fmt == "jsonl" else None
    if record is not None:
        if not spec.filter.keeps_record(record, where):
            return Drop.FILTERED
        text = _field_text(spec, where, record)
    if not text.strip():
        if spec.skip_empty:
            return Drop.EMPTY
        what = "document" if fmt == "text" else f"'{spec.json_key}'"
        raise UserError(f"{where}: empty {what}; remove it or pass --skip-empty")
    return text if spec.filter.keeps_text(text) else Drop.FILTERED


def _json_object(where: str, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _field_text(spec: InputSpec, where: str, record: dict) -> str:
    if spec.json_key not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise UserError(f"{where}: no key '{spec.json_key}' (keys: {keys}); choose one with --text-field")
    value = record[spec.json_key]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{where}: '{spec.json_key}' is {kind}, expected a string")
    return value


def iter_texts(spec: InputSpec) -> Iterator[str]:
    """Every document's text, in order, parsed in this process (tokenizer training)."""
    for i in range(len(spec.paths)):
        for line_no, raw, _ in iter_raw(spec, i):
            text = parse(spec, i, line_no, raw)
            if isinstance(text, str):
                yield text


def batches(spec: InputSpec, max_bytes: int = 1 << 18, max_records: int = 512
            ) -> Iterator[Tuple[List[RawRecord], int]]:
    """Raw records grouped for workers, with the input bytes each group consumed."""
    batch: List[RawRecord] = []
    size = used = 0
    for i in range(len(spec.paths)):
        for line_no, raw, n in iter_raw(spec, i):
            batch.append((i, line_no, raw))
            size += len(raw) if isinstance(raw, bytes) else len(raw[spec.json_key] or "")
            used += n
            if size >= max_bytes or len(batch) >= max_records:
                yield batch, used
                batch, size, used = [], 0, 0
    if batch or used:
        yield batch, used


def total_bytes(spec: InputSpec) -> Optional[int]:
    """The progress bar's total: None when standard input is among the inputs."""
    sizes = [sources.size(p, spec.fmt) for p in spec.paths]
    return None if None in sizes else sum(sizes)
