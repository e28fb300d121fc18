"""Reading a DCP directory someone else wrote without running code from it.

torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load`` and its default
planner loads every non-tensor entry with an unrestricted ``torch.load``: either runs
whatever a crafted file names. Here ``.metadata`` is unpickled through an allow-list of the record
types DCP writes (its metadata dataclasses, ``torch.Size``, dtypes, paths), non-tensor entries
through ``torch.load(weights_only=True)`` (tensor entries already are), and the result checked
(data files inside the directory, chunks inside their tensor) before DCP reads a byte of data.
"""
from __future__ import annotations

import importlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megallama.checkpoint.safe_pickle import refusal_reason
from megallama.errors import UserError

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30
_DCP = "torch.distributed.checkpoint."
_ALLOWED = {(_DCP + "metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                             "TensorStorageMetadata", "BytesStorageMetadata",
                                             "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}
_ALLOWED |= {(_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
             ("collections", "OrderedDict")}
# megatron-core's planner keeps each rank's save plan in the metadata (inert dataclasses and an enum)
_ALLOWED |= {(_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}
_ALLOWED |= {(m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                                     "PureWindowsPath")}


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(importlib.import_module(module), name)
        raise _Refused(f"it names {module}.{name}, not a DCP metadata record")


def read_metadata(path: Path) -> Metadata:
    """``path/.metadata`` through the allow-list, or one line saying why not."""
    f = path / METADATA
    if not f.is_file():
        raise UserError(f"{path}: no {METADATA} (not a torch.distributed.checkpoint directory)")
    if f.stat().st_size > MAX_METADATA_BYTES:
        raise UserError(f"{f}: {f.stat().st_size} bytes, too large for DCP metadata")
    try:
        with open(f, "rb") as fh:
            meta = _MetadataUnpickler(fh).load()
    except _Refused as exc:
        raise UserError(f"{f}: refused: {exc}; it was not unpickled because that could run code") from None
    except Exception as exc:  # truncated, a record built with bad fields ...
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{f}: not readable DCP metadata ({reason})") from None
    if not isinstance(meta, Metadata) or not isinstance(getattr(meta, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(meta, "storage_data", None), dict):
        raise UserError(f"{f}: not DCP metadata (got a {type(meta).__name__})")
    return meta


def _check(path: Path, meta: Metadata) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``fqn -> (shape, dtype)`` of every tensor; files and chunks checked first."""
    for index, info in meta.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", "..") or \
                not (path / rel).is_file():
            raise UserError(f"{path / METADATA}: entry '{getattr(index, 'fqn', '?')}' names data file "
                            f"{str(rel)[:80]!r}, not a file in {path}")
    tensors = {}
    for fqn, md in meta.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata) or not isinstance(md.properties.dtype, torch.dtype):
            raise UserError(f"{path / METADATA}: entry {str(fqn)[:100]!r} is neither a tensor nor a value")
        shape = tuple(int(s) for s in md.size)
        covered = 0
        for c in md.chunks:
            if len(c.offsets) != len(shape) or len(c.sizes) != len(shape) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, shape)):
                raise UserError(f"{path / METADATA}: tensor '{fqn}' has a chunk outside its shape {shape}")
            covered += int(torch.Size(c.sizes).numel())
        if covered != torch.Size(shape).numel():
            raise UserError(f"{path / METADATA}: tensor '{fqn}' chunks hold {covered} of its "
                            f"{torch.Size(shape).numel()} values")
        tensors[fqn] = (shape, md.properties.dtype)
    return tensors


class _Reader(FileSystemReader):
    """DCP's file reader with the checked metadata (read once, not unpickled again per load)."""

    def __init__(self, path: Path, meta: Metadata):
        super().__init__(str(path))
        self._meta = meta

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._meta


class _Planner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read as plain data only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _BoxPlanner(_Planner):
    """Reads one box of a tensor (a stacked layer, a row block): only the chunks it overlaps."""

    def __init__(self, offsets: Tuple[int, ...]):
        super().__init__()
        self._offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        ((fqn, dest),) = self.state_dict.items()
        box = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=dest.size())
        return LoadPlan(create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [box]))

    def lookup_tensor(self, index) -> torch.Tensor:  # the box's own tensor; read offsets are relative to it
        return self.state_dict[index.fqn]


class SafeDcpReader:
    """Tensors and values of one DCP directory, each read on demand through DCP's planner."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a checkpoint directory")
        self.meta = read_metadata(self.path)
        self.tensors = _check(self.path, self.meta)
        self._reader = _Reader(self.path, self.meta)

    def _load(self, fqn: str, dest: Any, planner: DefaultLoadPlanner = None) -> Any:
        state = {fqn: dest}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
                dcp.load(state, storage_reader=self._reader, planner=planner or _Planner())
        except (Exception, CheckpointException) as exc:  # the latter wraps the first rank's error
            if isinstance(exc, CheckpointException) and exc.failures:
                exc = next(iter(exc.failures.values()))[0]
            raise UserError(f"{self.path}: '{fqn}' could not be read ({refusal_reason(exc)}); nothing in it was "
                            "run") from None
        return state[fqn]

    def load(self, fqn: str) -> torch.Tensor:
        shape, dtype = self.tensors[fqn]
        return self._load(fqn, torch.zeros(shape, dtype=dtype))

    def load_box(self, fqn: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
        """``tensor[o0:o0+s0, o1:o1+s1, ...]`` read without the rest of the tensor."""
        shape, dtype = self.tensors[fqn]
        if len(offsets) != len(shape) or any(o < 0 or o + n > m for o, n, m in zip(offsets, sizes, shape)):
            raise ValueError(f"box {offsets}+{sizes} outside '{fqn}' of shape {shape}")
        return self._load(fqn, torch.zeros(tuple(sizes), dtype=dtype), _BoxPlanner(tuple(offsets)))

    def load_value(self, fqn: str) -> Any:
        """A non-tensor entry (``train_state.step``) as plain data, or None if absent."""
        if not isinstance(self.meta.state_dict_metadata.get(fqn), BytesStorageMetadata):
            return None
        return self._load(fqn, None)
