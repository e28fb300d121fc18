"""DeepSpeed's hostfile: ``host slots=N`` a line, ``#`` comments, blank lines. A line DeepSpeed
would refuse (or read differently) is refused here with its file:line."""
from __future__ import annotations

import re
from typing import List

from megallama.doctor.model import Host
from megallama.errors import UserError

_LINE = re.compile(r"^(\S+)\s+slots=(\S+)$")
_HOST = re.compile(r"^[A-Za-z0-9_.:\-\[\]%]+$")


def parse_hostfile(path: str) -> List[Host]:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except IsADirectoryError:
        raise UserError(f"--hostfile {path}: is a directory, expected a file of 'host slots=N' lines") from None
    except OSError as exc:
        raise UserError(f"--hostfile {path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--hostfile {path}: not UTF-8 text, expected 'host slots=N' lines") from None
    hosts: List[Host] = []
    seen = {}
    for n, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        m = _LINE.match(body)
        if not m or not _HOST.match(m.group(1)):
            raise UserError(f"{path}:{n}: expected 'host slots=N', got {body[:60]!r}")
        name, slots = m.group(1), m.group(2)
        if not (slots.isdigit() and slots.isascii() and 0 < int(slots) < 1 << 16):
            raise UserError(f"{path}:{n}: slots must be a positive integer, got {slots[:20]!r}")
        if name in seen:
            raise UserError(f"{path}:{n}: host {name} is listed again (first at line {seen[name]}); "
                            "DeepSpeed refuses duplicates")
        seen[name] = n
        hosts.append(Host(name, int(slots), n))
    if not hosts:
        raise UserError(f"--hostfile {path}: no 'host slots=N' lines")
    return hosts
