"""YAML from untrusted hands: safe tags only, and bounded before any Python object is built.

``yaml.safe_load`` executes nothing, but it is not bounded: its composer recurses once per
nesting level (a 50k-deep ``[[[...]]]`` is a RecursionError), an alias is one node however much
it names (a few hundred bytes of "billion laughs" expand to gigabytes once anything walks,
copies or prints the result), ``int()`` refuses literals over 4300 digits with a ValueError, and
a file of many megabytes takes most of a minute. A run config is a few kilobytes, so the text, the
nesting, the expanded size and the length of integer literals are all capped here, and every
breach is a :class:`ConfigError` naming the file (or ``--set`` key) and the line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import yaml

from megallama.config.schema import ConfigError

MAX_BYTES = 1 << 20          # a run config is kilobytes; thousands of data prefixes still fit
MAX_DEPTH = 32               # the deepest real config (deepspeed.zero_optimization.offload_*) is 4
MAX_VALUES = 50_000          # values after expanding every alias (pure-Python PyYAML: ~20 us each)
MAX_INT_CHARS = 64           # any config integer fits in ~20 digits; the schema bounds each field


class _Limit(Exception):
    def __init__(self, message: str, mark: Any = None):
        super().__init__(message)
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer counts nesting and whose int constructor checks length first."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            raise _Limit(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        self._nodes += 1
        if self._nodes > MAX_VALUES:  # stop parsing here: a long document is slow long before it is big
            raise _Limit(f"more than {MAX_VALUES:,} values", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INT_CHARS:
            raise _Limit(f"an integer of {len(node.value)} characters (at most {MAX_INT_CHARS})", node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _measure(node, depth: int, memo: Dict[int, Tuple[int, int]], open_: set) -> Tuple[int, int]:
    """(values, height) of ``node`` with aliases expanded; memoised per node, so a document of
    aliases of aliases costs its distinct nodes, not its expansion. Recursion stops at MAX_DEPTH."""
    key = id(node)
    if key in memo:
        values, height = memo[key]
    else:
        if key in open_:
            raise _Limit("an alias refers to a collection that contains it", node.start_mark)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        open_.add(key)
        values, height = 1, 1
        for child in children:
            if depth + 1 >= MAX_DEPTH:
                raise _Limit(f"nested deeper than {MAX_DEPTH} levels (through aliases)", child.start_mark)
            v, h = _measure(child, depth + 1, memo, open_)
            values, height = values + v, max(height, h + 1)
        open_.discard(key)
        memo[key] = values, height
    if depth + height > MAX_DEPTH:
        raise _Limit(f"nested deeper than {MAX_DEPTH} levels (through aliases)", node.start_mark)
    return values, height


def load_text(text: str, where: str) -> Any:
    """Parse ``text`` (from ``where``: a file name or ``--set KEY``) within the limits above."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters of YAML; a run config is at most {MAX_BYTES:,}")
    try:
        loader = _Loader(text)  # its reader refuses control characters already here
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values, _ = _measure(node, 0, {}, set())
        if values > MAX_VALUES:
            raise _Limit(f"{values:,} values once its aliases are expanded (at most {MAX_VALUES:,})")
        return loader.construct_document(node)
    except _Limit as exc:
        line = f" line {exc.mark.line + 1}" if exc.mark is not None else ""
        raise ConfigError(f"{where}{line}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()


def _read_text(path, what: str) -> str:
    """The file's text, refused by its size before it is read whole."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file '{path}' not found")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"{what}: {path}: larger than {MAX_BYTES:,} bytes; a config is a few kilobytes")
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {path}: {exc.strerror or exc}") from None


def load_file(path, what: str = "config") -> Any:
    """Read and parse a YAML file within the limits above."""
    return load_text(_read_text(path, what), f"{what}: {path}")


def load_json_file(path, what: str) -> Any:
    """Read and parse a JSON file (a DeepSpeed config) within the same limits."""
    text = _read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{what}: {path}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise ConfigError(f"{what}: {path}: {str(exc).split(';')[0]}") from None
    _check_tree(data, f"{what}: {path}")
    return data


def _check_tree(data: Any, where: str) -> None:
    """Depth, size and integer bounds of parsed JSON, walked without recursion."""
    stack, values = [(data, 1)], 0
    while stack:
        obj, depth = stack.pop()
        values += 1
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if values > MAX_VALUES:
            raise ConfigError(f"{where}: more than {MAX_VALUES:,} values")
        if isinstance(obj, int) and obj.bit_length() > 3.33 * MAX_INT_CHARS:
            raise ConfigError(f"{where}: an integer of more than {MAX_INT_CHARS} digits")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)
