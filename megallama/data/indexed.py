"""The Megatron / GPT-NeoX memory-mapped indexed format (``PREFIX.bin`` + ``PREFIX.idx``).

``.idx`` layout (little-endian), as megatron.core.datasets.indexed_dataset writes it::

    b"MMIDIDX\\x00\\x00"  u64 version=1  u8 dtype code  u64 S (sequences)  u64 D (document_indices)
    i32[S] sequence lengths   i64[S] byte offsets into .bin   i64[D] document boundaries
    (i8[S] sequence modes, multimodal files only)

``.bin`` holds the tokens of all sequences back to back. A document is one or more consecutive
sequences (Megatron's sentence splitting); we write one sequence per document. Reading maps both
files and never copies tokens; every size is checked against the other file so a truncated or
mismatched pair fails with one line instead of returning garbage.
"""
from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from megallama.data.files import refuse_existing, remove_quietly, temp_name
from megallama.errors import UserError

HEADER = b"MMIDIDX\x00\x00"
HEADER_SIZE = 9 + 8 + 1 + 8 + 8
# Megatron's DType codes; the numbers are part of the file format.
DTYPES: Dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
                               4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.float64),
                               7: np.dtype(np.float32), 8: np.dtype(np.uint16)}
CODES = {dtype: code for code, dtype in DTYPES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Megatron's rule (``DType.optimal_dtype``): uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def normalize_prefix(prefix: str) -> str:
    """Accept ``x``, ``x.bin`` or ``x.idx`` for the prefix ``x``."""
    s = os.fspath(prefix)
    return s[:-4] if s.endswith((".bin", ".idx")) else s


class IndexedTokens:
    """Zero-copy reader: ``len()`` documents, ``ds[d]`` the tokens of document ``d`` (a view)."""

    def __init__(self, prefix: str):
        self.prefix = normalize_prefix(prefix)
        self.idx_path, self.bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise UserError(f"{path}: not found (expected a .bin/.idx pair for prefix {self.prefix})")
        self._read_index()
        self._map_bin()

    def _fail(self, what: str, path: Optional[str] = None):
        raise UserError(f"{path or self.idx_path}: {what}")

    def _read_index(self) -> None:
        size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
        if head[:9] != HEADER:
            self._fail("not a Megatron indexed-dataset index (missing MMIDIDX header)")
        if len(head) < HEADER_SIZE:
            self._fail(f"truncated: {size} bytes, the header alone needs {HEADER_SIZE}")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            self._fail(f"unsupported index version {version} (expected 1)")
        if code not in DTYPES:
            self._fail(f"unknown dtype code {code} (expected one of {sorted(DTYPES)})")
        self.dtype = DTYPES[code]
        tokens_in_bin = os.path.getsize(self.bin_path) // self.dtype.itemsize
        if n_seq > tokens_in_bin + 1024 or n_doc > n_seq + 1025:  # sequences are not free: each holds tokens
            self._fail(f"its header claims {n_seq} sequences and {n_doc} document boundaries, more than "
                       f"{self.bin_path}'s {tokens_in_bin} tokens can hold (corrupt or not a pair)")
        need = HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
        if size < need:
            self._fail(f"truncated: {size} bytes, but its header describes {n_seq} sequences and "
                       f"{n_doc} document boundaries ({need} bytes)")
        if size not in (need, need + n_seq):  # + one int8 mode per sequence in multimodal files
            self._fail(f"{size} bytes, expected {need} for {n_seq} sequences and {n_doc} document boundaries")
        self._idx_map = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        buf = self._idx_map
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, off + 12 * n_seq)
        di = self.document_indices
        if n_doc < 1 or di[0] != 0 or di[-1] != n_seq:
            self._fail(f"document boundaries must run from 0 to {n_seq} sequences")
        if n_doc > 2 and (np.any(np.diff(di) < 0) or di.min() < 0 or di.max() > n_seq):
            self._fail(f"document boundaries must be non-decreasing sequence indices within 0..{n_seq}")
        if n_seq and (self.sequence_pointers[0] != 0):
            self._fail("the first sequence does not start at byte 0 of the .bin")

    def _map_bin(self) -> None:
        n_seq = len(self.sequence_lengths)
        item = self.dtype.itemsize
        self.num_tokens = int(self.sequence_pointers[-1]) // item + int(self.sequence_lengths[-1]) if n_seq else 0
        size = os.path.getsize(self.bin_path)
        if size != self.num_tokens * item:
            state = "truncated" if size < self.num_tokens * item else "longer than its index says"
            self._fail(f"{size} bytes, but {self.idx_path} describes {self.num_tokens} {self.dtype.name} tokens "
                       f"({self.num_tokens * item} bytes): {state}, or the two files are not a pair", self.bin_path)
        self.tokens = (np.memmap(self.bin_path, mode="r", dtype=self.dtype, shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, self.dtype))
        seq_start = np.empty(n_seq + 1, np.int64)
        seq_start[0] = 0
        np.cumsum(self.sequence_lengths, out=seq_start[1:])
        self._seq_start = seq_start
        self.doc_offsets = seq_start[self.document_indices]  # token offset of each document, plus the end

    def verify(self) -> None:
        """The checks too slow for every open: contiguous pointers, monotone boundaries."""
        item = self.dtype.itemsize
        if (self.sequence_lengths < 0).any():
            self._fail("negative sequence length")
        if not np.array_equal(self.sequence_pointers, self._seq_start[:-1] * item):
            self._fail("sequence byte offsets do not match the sequence lengths (corrupt index)")
        if (np.diff(self.document_indices) < 0).any():
            self._fail("document boundaries are not increasing (corrupt index)")

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, d: int) -> np.ndarray:
        if not -len(self) <= d < len(self):
            raise IndexError(f"document {d} out of range for {len(self)} documents")
        d %= len(self)
        return self.tokens[self.doc_offsets[d]:self.doc_offsets[d + 1]]

    def max_token_id(self, chunk: int = 1 << 24) -> int:
        """Largest id in the file (a streaming scan: bounded memory on any size)."""
        best = -1
        for start in range(0, self.num_tokens, chunk):
            best = max(best, int(self.tokens[start:start + chunk].max()))
        return best


class IndexedWriter:
    """Append documents, then ``finalize()``: temp files renamed into place, ``.idx`` last.

    Use as a context manager: on an exception the temporary files are removed and nothing under
    the final names changes.
    """

    def __init__(self, prefix: str, dtype, overwrite: bool = False):
        self.prefix = normalize_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        refuse_existing([self.bin_path, self.idx_path], overwrite)
        Path(self.bin_path).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp, self._idx_tmp = temp_name(self.bin_path), temp_name(self.idx_path)
        self._fh = open(self._bin_tmp, "wb")
        self._lengths = array("i")
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"token ids outside the range of {self.dtype.name}")
            arr = arr.astype(self.dtype)
        self._fh.write(arr.tobytes())
        self._lengths.append(arr.size)
        self.num_tokens += arr.size

    def add_documents(self, flat: np.ndarray, lengths) -> None:
        """Many documents at once: ``flat`` is their tokens back to back."""
        self._fh.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._lengths.extend(int(n) for n in lengths)
        self.num_tokens += int(np.sum(lengths, dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        self._fh.close()
        lengths = np.frombuffer(self._lengths, np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(self._idx_tmp, "wb") as fh:
            fh.write(HEADER + struct.pack("<QBQQ", 1, CODES[self.dtype], len(lengths), len(lengths) + 1))
            fh.write(lengths.tobytes())
            fh.write(pointers.tobytes())
            fh.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        remove_quietly(self.idx_path)  # never an old index beside a new .bin
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._fh.close()
        remove_quietly(self._bin_tmp)
        remove_quietly(self._idx_tmp)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
