"""Reading checkpoint files someone else made: every declared size checked before allocating.

safetensors' own loader trusts its header (a 16 GiB tensor declared over a small sparse file is
allocated in full), and a config read from a checkpoint decides how large a model gets built.
Here a header is parsed by hand and each tensor checked against the file's size, hard bounds and
the shapes the model config implies; a config must pass the normal validation and fit this
machine's memory; and any parser failure becomes one line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from megallama.config import ConfigError, ModelConfig
from megallama.config.schema import MAX_SIZE
from megallama.errors import UserError

MAX_JSON_BYTES = 64 << 20  # configs, manifests, layouts and indexes are small; a huge one is not ours
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATS = {"F64", "F32", "F16", "BF16"}
TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
              "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
Header = Dict[str, Tuple[str, Tuple[int, ...]]]


def read_json(path: Path, what: str = "object") -> Any:
    """The JSON in ``path`` (an object unless ``what`` says otherwise), or one line naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{path}: {size} bytes, too large for a checkpoint's JSON (limit {MAX_JSON_BYTES})")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (ValueError, RecursionError, OSError) as exc:  # JSONDecodeError, bad UTF-8, a directory
        raise UserError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if what == "object" and not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> Header:
    """``name -> (dtype, shape)`` from a safetensors header, each entry checked against the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise UserError(f"{path}: not a safetensors file (header length {n} in a {size}-byte file)")
            raw = json.loads(fh.read(n))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (ValueError, RecursionError, OSError) as exc:
        raise UserError(f"{path}: not a safetensors file (unreadable header: {type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a safetensors file (header is not an object)")
    data_bytes = size - 8 - n
    out: Header = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        bad = _entry_problem(info, data_bytes)
        if bad:
            raise UserError(f"{path}: tensor {name[:100]!r}: {bad}")
        out[name] = (info["dtype"], tuple(info["shape"]))
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_problem(info, data_bytes: int) -> Optional[str]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return "expected an entry with dtype, shape and data_offsets"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        return f"unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d <= MAX_SIZE for d in shape):
        return f"shape must be up to 8 sizes in 0..{MAX_SIZE}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"data_offsets must lie within the file's {data_bytes} data bytes"
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        return f"shape {shape} of {dtype} needs {nbytes} bytes, its offsets span {offsets[1] - offsets[0]}"
    return None


def check_header(path: Path, header: Header, expected: Dict[str, Tuple[int, ...]], floats: bool = True) -> None:
    """Each tensor in ``header`` is one ``expected`` names, with that shape (and floating point)."""
    for name, (dtype, shape) in header.items():
        if name not in expected:
            raise UserError(f"{path}: unexpected tensor {name[:100]!r}")
        if shape != tuple(expected[name]):
            raise UserError(f"{path}: tensor '{name}' has shape {shape}, expected {tuple(expected[name])} "
                            "from the config")
        if floats and dtype not in FLOATS:
            raise UserError(f"{path}: tensor '{name}' has dtype {TORCH_NAME[dtype]}, expected a floating-point type")


def load_tensors(path: Path, expected: Optional[Dict[str, Tuple[int, ...]]] = None,
                 names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file (``names`` of them, default all) after its header checks out
    (against ``expected`` shapes when given); nothing is allocated before that."""
    from safetensors import safe_open

    header = safetensors_header(path)
    if expected is not None:
        check_header(path, header, expected)
    wanted = list(header) if names is None else list(names)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in wanted}
    except Exception as exc:  # SafetensorError and friends: one line, never a traceback
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path}: unreadable safetensors file ({first})") from None


def model_config(fields: Any, where: str) -> ModelConfig:
    """A model config read from a checkpoint, through the normal validation and a memory check."""
    from pydantic import ValidationError

    if not isinstance(fields, dict):
        raise UserError(f"{where}: 'model' must be an object, got {type(fields).__name__}")
    try:
        cfg = ModelConfig.model_validate(fields)
    except ValidationError as exc:  # one line naming the field
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in ("model",) + tuple(err["loc"]))
        got = repr(err.get("input"))[:80]
        raise ConfigError(f"{where}: {loc}: {err['msg'][:1].lower() + err['msg'][1:]} (got {got})") from None
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check_fits_memory(cfg, where)
    return cfg


def n_params(cfg: ModelConfig) -> int:
    """A lower bound on the parameter count, from sizes alone (nothing built, so any size is cheap)."""
    attn = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    layers = cfg.n_layers + (cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0)
    vocab = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * cfg.dim  # embedding and head, or one tied
    return layers * (attn + 3 * cfg.dim * cfg.ffn_hidden_size + 2 * cfg.dim) + vocab


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 50


def check_fits_memory(cfg: ModelConfig, where: str) -> None:
    """The weights (at 2 bytes each) and the RoPE tables must fit this machine's memory: a config
    can declare a model no file holds, and building it would allocate all of it."""
    need = n_params(cfg) * 2 + cfg.max_seq_len * cfg.head_dim * 16
    have = physical_memory()
    if need > have:
        raise UserError(f"{where}: its model needs at least {need / 2**30:.1f} GiB to load, more than this "
                        f"machine's {have / 2**30:.1f} GiB (a damaged or hostile config?)")


def check_shipped(cfg: ModelConfig, files: Iterable[Path], where: str, bytes_per_param: int = 2) -> None:
    """A checkpoint whose config declares more weights than its files could hold is refused."""
    shipped = sum(Path(f).stat().st_size for f in files)
    need = n_params(cfg) * bytes_per_param
    if need > shipped:
        raise UserError(f"{where}: the config declares {n_params(cfg):,} parameters ({need:,} bytes at "
                        f"{bytes_per_param} per value), but the weight files hold only {shipped:,} bytes")
