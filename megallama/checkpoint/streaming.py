"""Tensors read only when written, so a conversion never holds the model in memory.

A :class:`Lazy` tensor knows its shape and dtype up front and reads its rows from the input
files (safetensors' ``safe_open``; a row range through ``get_slice``) only when asked. Name
mappings fuse (:func:`cat`) and split (``Lazy.split``) them without reading anything, so a
safetensors header and a shard plan can be written first and each tensor's bytes streamed in
turn, a block of rows at a time: peak memory is bounded by that block, not by the model (nor
even by its largest tensor). Plain tensors pass through the same functions, so one mapping
serves in-memory state dicts too.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megallama.checkpoint.safe_read import TORCH_NAME, check_header, safetensors_header
from megallama.errors import UserError

Reader = Callable[[int, int], torch.Tensor]  # rows start:stop of dim 0, in the source's dtype
_ST_NAME = {getattr(torch, t): s for s, t in TORCH_NAME.items() if hasattr(torch, t)}
CHUNK_BYTES = 64 << 20  # rows written per read: bounds peak memory below even the largest tensor
DEFAULT_SHARD_SIZE = "5GB"  # the Hub's Llama shards (transformers 4's default; 5 raised it to 50GB)


class Lazy:
    """A tensor described by shape and dtype, its rows read on demand (cast to ``dtype``)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, read: Reader):
        self.shape, self.dtype, self._read = tuple(shape), dtype, read

    def load(self) -> torch.Tensor:
        return self._rows(0, self.shape[0] if self.shape else 1)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        return self._read(start, stop).to(self.dtype)

    def rows(self, start: int, stop: int) -> "Lazy":
        return Lazy((stop - start,) + self.shape[1:], self.dtype, lambda a, b: self._read(start + a, start + b))

    def split(self, sizes: Sequence[int]) -> List["Lazy"]:
        bounds = [0] + [sum(sizes[:i + 1]) for i in range(len(sizes))]
        return [self.rows(a, b) for a, b in zip(bounds, bounds[1:])]

    def to(self, dtype: torch.dtype) -> "Lazy":
        return Lazy(self.shape, dtype, self._read)

    def contiguous(self) -> "Lazy":
        return self

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


Tensorish = Union[torch.Tensor, Lazy]


def materialize(t: Tensorish) -> torch.Tensor:
    return t.load() if isinstance(t, Lazy) else t


def equal(a: Tensorish, b: Tensorish, block_rows: int = 4096) -> bool:
    """``torch.equal`` a block of rows at a time (two lazy tensors are never both read whole)."""
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    a, b = _as_lazy(a), _as_lazy(b)
    rows = a.shape[0] if a.shape else 1
    return all(torch.equal(a.rows(i, min(i + block_rows, rows)).load(), b.rows(i, min(i + block_rows, rows)).load())
               for i in range(0, rows, block_rows))


def _as_lazy(t: Tensorish) -> Lazy:
    return t if isinstance(t, Lazy) else Lazy(t.shape, t.dtype, lambda a, b: t[a:b])


def cat(parts: Sequence[Tensorish]) -> Tensorish:
    """``torch.cat`` along dim 0; lazy if any part is, reading only the parts a row range touches."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    lazies = [_as_lazy(p) for p in parts]
    dtype = lazies[0].dtype
    for p in lazies[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    starts = [0]
    for p in lazies:
        starts.append(starts[-1] + p.shape[0])

    def read(start: int, stop: int) -> torch.Tensor:
        pieces = [p._rows(max(start - s, 0), min(stop - s, p.shape[0])).to(dtype)
                  for p, s in zip(lazies, starts) if s < stop and s + p.shape[0] > start]
        return torch.cat(pieces)

    return Lazy((starts[-1],) + lazies[0].shape[1:], dtype, read)


def open_safetensors(path: Path, expected: Optional[Dict[str, Tuple[int, ...]]] = None) -> Dict[str, Lazy]:
    """The tensors of a safetensors file as :class:`Lazy` (read with ``safe_open`` when used),
    after its header checks out against the file and ``expected`` shapes; nothing is read."""
    from safetensors import safe_open

    header = safetensors_header(path)
    if expected is not None:
        check_header(path, header, expected)
    try:
        with safe_open(str(path), framework="pt"):  # safetensors' own checks (overlaps, gaps) up front
            pass
    except Exception as exc:  # SafetensorError and friends: one line, never a traceback
        raise UserError(f"{path}: unreadable safetensors file ({_first_line(exc)})") from None
    return {name: Lazy(shape, getattr(torch, TORCH_NAME[dtype]), _file_reader(path, name, shape))
            for name, (dtype, shape) in header.items()}


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _file_reader(path: Path, name: str, shape: Tuple[int, ...]) -> Reader:
    def read(start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        try:  # opened per read: the mapping (and its resident pages) goes once these rows are read
            with safe_open(str(path), framework="pt") as f:
                if not shape or (start, stop) == (0, shape[0]):
                    return f.get_tensor(name)
                return f.get_slice(name)[start:stop]
        except Exception as exc:
            raise UserError(f"{path}: unreadable safetensors file ({_first_line(exc)})") from None
    return read


def nbytes(t: Tensorish) -> int:
    return t.numel() * t.element_size()


def write_safetensors(path: Path, tensors: Mapping[str, Tensorish], metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file written tensor by tensor: the header comes from shapes and dtypes, then
    each tensor is read (if lazy), written and dropped before the next."""
    if sys.byteorder != "little":  # safetensors stores little-endian; raw bytes are written here
        raise UserError("writing safetensors needs a little-endian machine")
    entries, offset = {}, 0
    for name, t in tensors.items():
        size = nbytes(t)
        entries[name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        for name, t in tensors.items():
            write_tensor(fh, name, t)
        fh.flush()
        os.fsync(fh.fileno())


def write_tensor(fh, name: str, t: Tensorish) -> None:
    """``t``'s bytes, a block of rows (about ``CHUNK_BYTES``) at a time, so not even one whole
    tensor need be resident (nor its source and its cast copy together)."""
    rows = t.shape[0] if t.shape else 1
    step = max(1, CHUNK_BYTES // max(1, nbytes(t) // max(rows, 1)))
    lazy = _as_lazy(t) if t.shape else Lazy((1,), t.dtype, lambda a, b: t.reshape(1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        data = lazy.rows(start, stop).load().detach().to(device="cpu", dtype=t.dtype).contiguous()
        if tuple(data.shape) != (stop - start,) + tuple(t.shape[1:]):
            raise UserError(f"{fh.name}: tensor '{name}' read with shape {tuple(data.shape)}, expected rows "
                            f"{start}:{stop} of {tuple(t.shape)}")
        fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))


def plan_shards(tensors: Mapping[str, Tensorish], max_bytes: int) -> List[List[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(t)
    return shards


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, what: str = "--shard-size") -> int:
    """Bytes from ``5GB``, ``500MiB``, ``2.5GB`` or a plain byte count (units as Hugging Face's)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text), re.IGNORECASE)
    unit = (m.group(2) or "").upper() if m else None
    if m is None or unit not in _UNITS or int(float(m.group(1)) * _UNITS[unit]) < 1:
        raise UserError(f"{what}: expected a positive size such as 5GB, 500MB or 2GiB, got {str(text)[:40]!r}")
    return int(float(m.group(1)) * _UNITS[unit])
