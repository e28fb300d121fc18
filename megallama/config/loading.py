"""Reading a run config: bounded safe YAML (``bounded_yaml``), dotted ``--set`` overrides, presets
and DeepSpeed JSON resolved, then every section validated into the typed objects of ``schema``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ValidationError

from megallama.config.bounded_yaml import load_file, load_json_file, load_text
from megallama.config.schema import ConfigError, ModelConfig, RunConfig, load_preset
from megallama.errors import did_you_mean, short_repr

# a model given as a mapping without a preset must say at least this much (else 7B defaults fill in)
MODEL_CORE = ("dim", "n_layers", "n_heads", "vocab_size")


def _leaf_paths(cls: type, prefix: str = "") -> Dict[str, str]:
    """Field name -> dotted path, for names that occur once in the run config."""
    seen: Dict[str, List[str]] = {}
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for leaf, path in _leaf_paths(ann, f"{prefix}{name}.").items():
                seen.setdefault(leaf, []).append(path)
        seen.setdefault(name, []).append(f"{prefix}{name}")
    return {leaf: paths[0] for leaf, paths in seen.items() if len(paths) == 1}


def _check_keys(data: Any, cls: type, prefix: str) -> None:
    """Unknown keys anywhere below ``cls``, reported with a did-you-mean (a key of another
    section, or a Megatron-DeepSpeed argument name, gets its full dotted path here)."""
    if not isinstance(data, dict):
        return
    fields = cls.model_fields
    for key, value in data.items():
        if key not in fields:
            shown = key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else None
            shown = short_repr(key) if shown is None or len(shown) > 80 else shown
            hint = did_you_mean(key[:200] if isinstance(key, str) else short_repr(key), fields,
                                paths=_leaf_paths(RunConfig))
            raise ConfigError(f"{prefix}{shown}: unknown key{hint} (expected one of: {', '.join(fields)})")
        ann = fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value, ann, f"{prefix}{key}.")


def build_section(cls, data: Any, prefix: str):
    """Validate ``data`` as ``cls``; the first problem becomes a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    _check_keys(data, cls, f"{prefix}." if prefix else "")
    try:
        obj = cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in (prefix,) + tuple(err["loc"]) if x != "")
        msg = err["msg"].lower().removeprefix("value error, ")   # our validators' ValueErrors read as theirs
        raise ConfigError(f"{loc}: {msg} (got {short_repr(err.get('input'))})") from None
    if isinstance(obj, ModelConfig):
        obj.check()
    return obj


def parse_override(item: str):
    """``a.b.c=value`` -> (['a','b','c'], value), value parsed as YAML (ints, bools, lists)."""
    shown = item if len(item) <= 80 else item[:77] + "..."
    if "=" not in item:
        raise ConfigError(f"--set {shown}: expected key=value, e.g. model.n_layers=4")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {shown}: empty key segment")
    if len(key) > 200 or key.count(".") > 16:
        raise ConfigError(f"--set {shown}: not a config key (too long)")
    try:
        value = load_text(raw, f"--set {key}") if raw != "" else ""
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise
        value = raw  # not YAML: the text itself, as a shell user means it
    return key.split("."), value


def apply_override(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    """Set ``path`` in ``tree``; each section on the way is copied first, so the caller's nested
    dicts (``load_run_config(data=...)``) are never changed."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            key = _list_index(node, part, path)
        else:
            key = part
            if part == "model" and isinstance(node.get("model"), str):
                node["model"] = {"preset": node["model"]}
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
        if isinstance(node[key], (dict, list)):
            node[key] = type(node[key])(node[key])
        node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: List[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not an index of a list of {len(node)}")
    return int(part)


def _resolve_deepspeed(value: Any, base: Optional[Path]) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"deepspeed: expected a JSON file path or a mapping, got {type(value).__name__}")
    if len(value) > 4096 or "\0" in value:
        raise ConfigError(f"deepspeed: {short_repr(value)} is not a file path")
    candidates = [Path(value)]
    if base is not None and not Path(value).is_absolute():
        candidates.append(base / value)
        candidates.append(Path(__file__).resolve().parents[2] / value)
    for path in candidates:
        if path.is_file():
            data = load_json_file(path, "deepspeed")
            if not isinstance(data, dict):
                raise ConfigError(f"deepspeed: {path}: expected a JSON object")
            return data
    raise ConfigError(f"deepspeed: file '{value}' not found")


def _require_model(value: Any) -> None:
    """A run config names its model; without this an empty file would start building 7B defaults."""
    if isinstance(value, dict) and ("preset" in value or all(k in value for k in MODEL_CORE)):
        return
    if isinstance(value, str) and value:
        return
    if isinstance(value, dict) and value:
        missing = ", ".join(k for k in MODEL_CORE if k not in value)
        raise ConfigError(f"model: name a preset (model: {{preset: tiny, ...}}) or give the architecture "
                          f"in full (missing: {missing})")
    if value is None or value == {} or value == "":
        raise ConfigError("model: a run config must name its model, e.g. 'model: tiny' or "
                          "'model: {preset: llama-7b}'")


def _resolve_model(value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ConfigError(f"model: expected a preset name or a mapping, got {type(value).__name__}")
    value = dict(value)
    name = value.pop("preset", None)
    if name is None:
        return value
    if not isinstance(name, str):
        raise ConfigError(f"model.preset: expected a preset name, got {name!r}")
    return {**load_preset(name), **value}


def load_run_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[List[str]] = None,
                    data: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Read ``path`` (or ``data``), apply ``--set`` overrides, validate every section."""
    base = None
    if path is not None:
        data = load_file(path)
        base = Path(path).resolve().parent
    if not isinstance(data or {}, dict):
        raise ConfigError(f"config: {path or 'data'}: expected a mapping at the top level, "
                          f"got {type(data).__name__}")
    tree = dict(data or {})
    if isinstance(tree.get("deepspeed"), str) or "deepspeed" not in tree:
        tree["deepspeed"] = _resolve_deepspeed(tree.get("deepspeed"), base)
    for item in overrides or []:
        keys, value = parse_override(item)
        if keys[0] == "deepspeed" and len(keys) == 1:
            value = _resolve_deepspeed(value, base)
        apply_override(tree, keys, value)
    _check_keys(dict.fromkeys(tree), RunConfig, "")  # a misspelt 'model' is that, not a missing model
    _require_model(tree.get("model"))
    tree["model"] = _resolve_model(tree.get("model"))
    if not isinstance(tree["deepspeed"], dict):
        tree["deepspeed"] = _resolve_deepspeed(tree["deepspeed"], base)
    cfg = build_section(RunConfig, tree, "")
    cfg.check_layout()
    return cfg
