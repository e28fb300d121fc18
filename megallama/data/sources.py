"""Where documents come from: local files and directories, plain or compressed, or standard input.

Line sources (JSONL or text; plain, gzip or zstandard; ``-`` for standard input) give bytes a line
at a time. Table sources (parquet, arrow, a ``datasets`` ``save_to_disk`` directory) give rows
through pyarrow, only the columns asked for, parquet a row group and arrow a record batch at a
time, so memory stays flat on any input size. A ``save_to_disk`` directory is read as the files
its ``state.json`` lists, the ones ``load_from_disk`` maps, without importing ``datasets`` (2 s)
or anything that reaches a hub. Nothing here downloads: a URL or hub name is refused, so
preprocessing never depends on the network.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import zlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from megallama.errors import UserError

STDIN = "-"
LINE_FORMATS = ("jsonl", "text")
TABLE_FORMATS = ("parquet", "arrow", "datasets")
FORMATS = ("auto",) + LINE_FORMATS + TABLE_FORMATS
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
ACCEPTED = ("accepted: JSONL (.jsonl/.json/.ndjson) or UTF-8 text, either also .gz or .zst; .parquet; .arrow; "
            "a datasets save_to_disk directory or a directory of .parquet or .arrow files; - (standard input); "
            "--input-format forces one")
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
         (b"PK\x03\x04", "zip"), (b"PAR1", "parquet"), (b"ARROW1", "arrow"), (b"7z\xbc\xaf\x27\x1c", "7z"))
ROWS_PER_CHUNK = 1024  # rows turned into Python objects at a time
HUB_HINT = ("preprocess reads local paths only and downloads nothing: fetch it first (e.g. huggingface-cli download "
            "--repo-type dataset NAME --local-dir DIR) and pass DIR")


def display(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def compression_of(path: str) -> Optional[str]:
    return None if path == STDIN else COMPRESSION.get(os.path.splitext(path)[1].lower())


def format_of(path: str, fmt: str = "auto") -> str:
    """``fmt``, or what the name says under ``auto`` (a compression suffix is looked through)."""
    if fmt != "auto":
        return fmt
    if path == STDIN:
        return "jsonl"
    stem = path.lower()
    if compression_of(path):
        stem = os.path.splitext(stem)[0]
    if stem.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if stem.endswith(".parquet"):
        return "parquet"
    if stem.endswith((".arrow", ".feather")):
        return "arrow"
    return "datasets" if os.path.isdir(path) else "text"


def expand(paths: Sequence[str], fmt: str = "auto") -> Tuple[str, ...]:
    """Inputs with each directory of parquet or arrow files replaced by its files, sorted by name
    (not recursive); a ``save_to_disk`` directory stays one input."""
    out: List[str] = []
    for path in paths:
        if path != STDIN and os.path.isdir(path) and fmt in ("auto", "parquet", "arrow") \
                and not os.path.isfile(os.path.join(path, "state.json")):
            out.extend(_table_files(path, fmt))
        else:
            out.append(path)
    return tuple(out)


def _table_files(directory: str, fmt: str) -> List[str]:
    names = sorted(os.listdir(directory))
    found = {f: [os.path.join(directory, n) for n in names if format_of(n) == f] for f in ("parquet", "arrow")}
    if fmt != "auto":
        found = {fmt: found[fmt]}
    kinds = [f for f, files in found.items() if files]
    if len(kinds) == 1:
        return found[kinds[0]]
    if len(kinds) == 2:
        raise UserError(f"{directory}: holds both .parquet and .arrow files; pass the ones to read")
    raise _not_a_dataset(directory)


def check(path: str, fmt: str) -> None:
    """Refuse, in one line, an input that cannot be read as ``fmt``, before any work starts."""
    kind = format_of(path, fmt)
    if kind not in FORMATS[1:]:
        raise UserError(f"--input-format: unknown format '{fmt}'; {ACCEPTED}")
    if path == STDIN:
        if kind not in LINE_FORMATS:
            raise UserError(f"-: standard input carries JSONL or text, not {kind} (pass a file or directory)")
        return
    if "://" in path or path.lower().startswith("hf:"):
        raise UserError(f"{path}: not a local path; {HUB_HINT}")
    if not os.path.exists(path):
        looks_like_hub = path.count("/") == 1 and not path.startswith((".", "/")) and "." not in path
        raise UserError(f"{path}: input file not found" + (f" (a hub dataset? {HUB_HINT})" if looks_like_hub else ""))
    if kind in TABLE_FORMATS or compression_of(path) == "zstd":
        _optional("pyarrow" if kind in TABLE_FORMATS else "zstandard", path)  # missing: fail before any work
    if kind == "datasets":
        _saved_dataset_files(path)
    elif not os.path.isfile(path):
        raise UserError(f"{path}: a directory, expected a {kind} file; {ACCEPTED}")
    if compression_of(path) and kind not in LINE_FORMATS:
        raise UserError(f"{path}: a compressed {kind} file is not read (parquet and arrow compress inside); "
                        "decompress it first")
    if kind == "text" and fmt == "auto" and not compression_of(path):
        _refuse_binary(path)


def _refuse_binary(path: str) -> None:
    """A file taken for text by its name that is plainly something else fails here, not as garbage."""
    import codecs

    with open(path, "rb") as fh:
        head = fh.read(4096)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 4096 bytes is fine
        text = b"\0" not in head
    except UnicodeDecodeError:
        text = False
    what = next((name for magic, name in MAGIC if head.startswith(magic)), None)
    if not text and (what or b"\0" in head):  # else invalid UTF-8 is reported at its line, as in any text
        raise UserError(f"{path}: unknown input format ({what or 'binary'} data); {ACCEPTED}")


def files_of(path: str, fmt: str = "auto") -> List[str]:
    """The files behind one input: a ``save_to_disk`` directory's arrow files, else itself."""
    return _saved_dataset_files(path) if format_of(path, fmt) == "datasets" else [path]


def size(path: str, fmt: str = "auto") -> Optional[int]:
    """Bytes the progress bar counts for ``path``: None for standard input (unknown)."""
    return None if path == STDIN else sum(os.path.getsize(f) for f in files_of(path, fmt))


@contextlib.contextmanager
def open_lines(path: str) -> Iterator[Tuple[object, Optional[Callable[[], int]]]]:
    """(binary stream, position in the source) for a line source. The position is the compressed
    file's for a compressed one (what the progress bar's total counts), None where the bytes read
    are the position. A corrupt or truncated stream is one line naming the file."""
    if path == STDIN:
        yield sys.stdin.buffer, None
        return
    kind = compression_of(path)
    with open(path, "rb") as raw:
        if kind is None:
            yield raw, None
            return
        errors: Tuple[type, ...] = (OSError, EOFError, zlib.error)
        if kind == "gzip":
            import gzip

            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            import io

            zstd = _optional("zstandard", path)
            errors += (zstd.ZstdError,)
            stream = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        try:
            with stream:
                yield stream, raw.tell
        except errors as exc:
            raise UserError(f"{path}: not readable as {kind} data ({type(exc).__name__}: {exc})") from None


def iter_rows(path: str, fmt: str, text_column: str, columns: Sequence[str]
              ) -> Iterator[Tuple[int, dict, int]]:
    """(row number from 0, {column: value} of ``columns``, source bytes consumed) for a table source."""
    pa = _optional("pyarrow", path)
    row = 0
    for file in files_of(path, fmt):
        try:
            for values, used in _file_rows(pa, file, fmt, text_column, list(columns)):
                for i, value in enumerate(values):
                    yield row, value, used if i == len(values) - 1 else 0
                    row += 1
        except pa.ArrowException as exc:  # raised while reading: corrupt or not this format
            what = "arrow" if fmt == "datasets" else fmt
            raise UserError(f"{file}: not readable as {what} ({str(exc).splitlines()[0]})") from None


def _file_rows(pa, file: str, fmt: str, text_column: str, columns: List[str]) -> Iterator[Tuple[list, int]]:
    """Chunks of rows as dicts, each with the file bytes it accounts for (summing to the file's size)."""
    total, credited, pending = os.path.getsize(file), 0, None
    for rows, done in _chunks(pa, file, fmt, text_column, columns):
        if pending is not None:
            yield pending
        used = min(done, total) - credited
        credited += used
        pending = (rows, used)
    if pending is not None:  # the last chunk carries what is left (an arrow stream's end marker)
        yield pending[0], pending[1] + total - credited


def _chunks(pa, file: str, fmt: str, text_column: str, columns: List[str]) -> Iterator[Tuple[list, int]]:
    """(at most ROWS_PER_CHUNK rows as dicts, bytes of the file read so far). Arrow is read a record
    batch at a time (not memory-mapped, so resident memory stays one batch, not the file)."""
    total = os.path.getsize(file)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        _check_columns(pa, file, pf.schema_arrow, text_column, columns)
        n_rows, done = max(pf.metadata.num_rows, 1), 0
        for group in range(pf.metadata.num_row_groups):  # not iter_batches: it reads ~20 groups ahead
            for batch in pf.read_row_group(group, columns=columns, use_threads=False).to_batches(ROWS_PER_CHUNK):
                done += batch.num_rows
                yield batch.to_pylist(), total * done // n_rows
        return
    with pa.OSFile(file) as source:
        try:
            reader = pa.ipc.open_file(source)  # arrow's file form (feather v2)
            n = max(reader.num_record_batches, 1)
            numbered = ((reader.get_batch(i), total * (i + 1) // n) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_stream(source)  # its stream form (what save_to_disk writes)
            numbered = ((batch, source.tell()) for batch in reader)
        _check_columns(pa, file, reader.schema, text_column, columns)
        for batch, done in numbered:
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, ROWS_PER_CHUNK):
                yield batch.slice(start, ROWS_PER_CHUNK).to_pylist(), done


def _check_columns(pa, file: str, schema, text_column: str, columns: Sequence[str]) -> None:
    names = schema.names
    for name in columns:
        if name not in names:
            flag = "--text-field" if name == text_column else "--filter"
            raise UserError(f"{file}: no column '{name}' (columns: {', '.join(names[:12])}); check {flag}")
    t = schema.field(text_column).type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or string_view(t)):
        raise UserError(f"{file}: column '{text_column}' is {t}, expected a string column; "
                        "choose one with --text-field")


def _saved_dataset_files(directory: str) -> List[str]:
    """The arrow files of a ``save_to_disk`` directory, in order, each checked to lie inside it."""
    state_path = os.path.join(directory, "state.json")
    if not os.path.isfile(state_path):
        raise _not_a_dataset(directory)
    entries = _read_json(state_path).get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{state_path}: expected '_data_files', a list of {{'filename': ...}} (save_to_disk's state)")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UserError(f"{state_path}: '_data_files' entry {entry!r} is not a file name in this directory")
        if not os.path.isfile(os.path.join(directory, name)):
            raise UserError(f"{os.path.join(directory, name)}: listed in {state_path} but missing")
        files.append(os.path.join(directory, name))
    return files


def _not_a_dataset(directory: str) -> UserError:
    """The error for a directory with nothing to read: a DatasetDict names its splits."""
    splits_path = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(splits_path):
        splits = [str(s) for s in _read_json(splits_path).get("splits") or []] or ["train"]
        return UserError(f"{directory}: a DatasetDict with splits {', '.join(splits)}; pass one split's "
                         f"directory, e.g. {os.path.join(directory, splits[0])}")
    return UserError(f"{directory}: no .parquet or .arrow files and no save_to_disk state.json; {ACCEPTED}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def _optional(package: str, path: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{path}: reading it needs the '{package}' package (pip install {package})") from None
