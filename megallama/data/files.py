"""Atomic outputs: write under a temporary name, rename at the end.

A crash, an error or Ctrl-C therefore never leaves a file that looks complete; existing outputs
are only replaced when the caller says so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

from megallama.errors import UserError

PathLike = Union[str, os.PathLike]


def temp_name(path: PathLike) -> Path:
    """A sibling of ``path`` that no reader mistakes for it (unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def refuse_existing(paths: Iterable[PathLike], overwrite: bool) -> None:
    """Never lose data silently: existing outputs need an explicit ``--overwrite``."""
    if overwrite:
        return
    for path in paths:
        if os.path.exists(path):
            raise UserError(f"{path}: already exists; pass --overwrite to replace it")


def remove_quietly(path: PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    tmp = temp_name(path)
    try:
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: PathLike) -> Any:
    """A JSON cache file, or None when absent or unreadable (a cache is rebuilt, not trusted)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
