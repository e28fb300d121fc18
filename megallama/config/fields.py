"""The building blocks of every config section: strict fields and the one-line error type.

YAML's ``true`` is not 1 anywhere in a config: integers are strict (no bools, floats or strings);
floats refuse bools but still read strings, since PyYAML reads ``1e-3`` (no dot) as a string.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from megallama.errors import UserError

MAX_SIZE = 2**31 - 1  # any one dimension of a tensor; beyond it sizes overflow before they fail to allocate
MAX_SEED = 2**31 - 1  # per-rank offsets are added to it; torch and numpy take any 32-bit seed
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ConfigError(UserError):
    """A bad configuration; the message is a single line meant for the user."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _int(default, ge: int = 1, le: int = MAX_SIZE):
    """An integer field with bounds (a count, a size, a period)."""
    return Field(default, ge=ge, le=le)


def _num(default, ge: float = None, gt: float = None, lt: float = None, le: float = None):
    """A finite float field with bounds (NaN and infinity are refused by name)."""
    return Field(default, ge=ge, gt=gt, lt=lt, le=le, allow_inf_nan=False)
