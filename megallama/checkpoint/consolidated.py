"""The layout-free checkpoint: the hub every other format converts through.

A directory holding ``config.json`` (the :class:`ModelConfig`, plus ``format`` and
``format_version``) and ``model.safetensors`` with the full, unsharded weights named as the
TP=1 model's ``state_dict`` (fused ``wqkv`` and ``w13`` included). Loading never unpickles.
Writes go to a temporary directory renamed into place, so a crash leaves no half checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

from megallama.config import ConfigError, ModelConfig
from megallama.errors import UserError

FORMAT = "megallama-consolidated"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def is_consolidated(path) -> bool:
    p = Path(path)
    if not (p / CONFIG).is_file():
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def save_consolidated(state: Dict[str, torch.Tensor], cfg: ModelConfig, out_dir, overwrite: bool = False,
                      extra: Dict = None) -> Path:
    """Write ``state`` (full tensors) and ``cfg`` atomically to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (refusing to overwrite; choose another --output)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.model_dump(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_consolidated(path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """``(config, full state dict)`` of a consolidated checkpoint; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    cfg_file, weights = p / CONFIG, p / WEIGHTS
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file}: not found (not a megallama consolidated checkpoint)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{cfg_file}: not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{cfg_file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.model_validate(meta["model"])
    except Exception as exc:  # pydantic error: report as one line
        raise ConfigError(f"{cfg_file}: model config invalid ({str(exc).splitlines()[0]})") from None
    if not weights.is_file():
        raise UserError(f"{weights}: not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: unreadable safetensors file ({exc})") from None
    return cfg, state
