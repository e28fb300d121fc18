"""Which records become documents: ``--filter FIELD=VALUE`` (equality on another field, all must
hold) and ``--min-chars N`` (shorter texts dropped), the two filters a Megatron or datatrove user
reaches for first; anything richer belongs in a datatrove pipeline ahead of this.

A field matches when its value written as text equals VALUE: a string as it is, anything else as
JSON writes it (``2020``, ``true``, ``null``), so one flag reads the same on a JSONL record and on a
typed parquet column. A record without the field is an error, not a silent mismatch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence, Tuple

from megallama.errors import UserError


@dataclass(frozen=True)
class RecordFilter:
    equals: Tuple[Tuple[str, str], ...] = ()
    min_chars: int = 0

    @property
    def fields(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(f for f, _ in self.equals))

    @property
    def active(self) -> bool:
        return bool(self.equals) or self.min_chars > 0

    def keeps_record(self, record: Mapping, where: str) -> bool:
        for name, value in self.equals:
            if name not in record:
                keys = ", ".join(list(record)[:8]) or "none"
                raise UserError(f"{where}: no key '{name}' for --filter {name}={value} (keys: {keys})")
            if as_text(record[name]) != value:
                return False
        return True

    def keeps_text(self, text: str) -> bool:
        return len(text) >= self.min_chars


def as_text(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # a parquet date or bytes: its Python form
        return str(value)


def parse_filters(flags: Sequence[str], min_chars: int = 0) -> RecordFilter:
    """``--filter FIELD=VALUE`` flags (split at the first ``=``) and ``--min-chars``."""
    equals = []
    for flag in flags or ():
        name, sep, value = flag.partition("=")
        if not sep or not name:
            raise UserError(f"--filter: expected FIELD=VALUE (e.g. lang=en), got '{flag}'")
        equals.append((name, value))
    if min_chars < 0:
        raise UserError(f"--min-chars: expected a non-negative integer, got {min_chars}")
    return RecordFilter(tuple(equals), min_chars)
