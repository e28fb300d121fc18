"""The layout-free checkpoint: the hub every other format converts through.

A directory holding ``config.json`` (the :class:`ModelConfig`, plus ``format`` and
``format_version``) and ``model.safetensors`` with the full, unsharded weights named as the
TP=1 model's ``state_dict`` (fused ``wqkv`` and ``w13`` included). Loading never unpickles.
Writes go to a temporary directory renamed into place, so a crash leaves no half checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

from pydantic import ValidationError

from megallama.config import ConfigError, ModelConfig
from megallama.errors import UserError
from megallama.checkpoint.staging import staged_dir

FORMAT = "megallama-consolidated"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CLASSIFIER_HEAD = "sequence_classification"  # config.json "head" of a fine-tuned classifier (``score``, no LM head)


def is_consolidated(path) -> bool:
    p = Path(path)
    if not (p / CONFIG).is_file():
        return False
    try:
        meta = json.loads((p / CONFIG).read_text())
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def save_consolidated(state: Mapping[str, Any], cfg: ModelConfig, out_dir, overwrite: bool = False,
                      extra: Dict = None) -> Path:
    """Write ``state`` (full tensors, plain or :class:`~megallama.checkpoint.streaming.Lazy`:
    streamed one by one) and ``cfg`` atomically to ``out_dir``."""
    from megallama.checkpoint.streaming import write_safetensors

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (refusing to overwrite; choose another --output)")
    with staged_dir(out) as tmp:
        write_safetensors(tmp / WEIGHTS, state, metadata={"format": FORMAT})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.model_dump(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return out


def load_consolidated(path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """``(config, full state dict)`` of a consolidated checkpoint; errors name the file."""
    from megallama.checkpoint.streaming import materialize

    cfg, lazy = open_consolidated(path, fits_memory=True)
    return cfg, {k: materialize(v) for k, v in lazy.items()}


def open_consolidated(path, fits_memory: bool = False):
    """``(config, lazy state dict)``: every check made, no tensor read (``convert`` streams it);
    ``fits_memory`` also requires the model to fit this machine, as loading it whole does."""
    p = Path(path)
    cfg_file, weights = p / CONFIG, p / WEIGHTS
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file}: not found (not a megallama consolidated checkpoint)")
    from megallama.checkpoint.safe_read import read_json

    meta = read_json(cfg_file, what="any")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{cfg_file}: format is {found!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.model_validate(meta.get("model"))
    except ValidationError as exc:  # one line naming the field
        err = exc.errors()[0]
        where = ".".join(str(x) for x in ("model",) + tuple(err["loc"]))
        raise ConfigError(f"{cfg_file}: {where}: {err['msg'].lower()} (got {err.get('input')!r})") from None
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: {exc}") from None
    if not weights.is_file():
        raise UserError(f"{weights}: not found")
    from megallama.checkpoint.safe_read import check_fits_memory, check_shipped
    from megallama.checkpoint.streaming import open_safetensors

    if meta.get("head", "lm") not in ("lm", CLASSIFIER_HEAD):
        raise UserError(f"{cfg_file}: head is {meta.get('head')!r}, expected 'lm' or {CLASSIFIER_HEAD!r}")
    classifier = meta.get("head") == CLASSIFIER_HEAD
    check_shipped(cfg, [weights], str(p))
    if fits_memory:
        check_fits_memory(cfg, str(cfg_file))
    state = open_safetensors(weights, expected=expected_shapes(cfg, str(weights), classifier))  # headers only
    _check_tensors(state, cfg, str(weights), classifier=classifier)  # none missing
    return cfg, state


def expected_shapes(cfg: ModelConfig, where: str, classifier: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor the config implies, from a model built on the meta device
    (nothing allocated); a config no model can have is one line naming ``where``."""
    from megallama.model import LlamaForSequenceClassification, build_model
    from megallama.parallel import ParallelState
    from megallama.parallel.layers import logical_shape

    try:
        with torch.device("meta"):
            build = LlamaForSequenceClassification if classifier else build_model
            model = build(cfg, ParallelState(), seed=None)
            params = dict(model.named_parameters())  # unpadded: a padded vocabulary is stored without it
            return {k: logical_shape(params[k]) if k in params else tuple(v.shape)
                    for k, v in model.state_dict().items()}
    except (RuntimeError, ValueError, OverflowError, TypeError) as exc:  # sizes no tensor can have
        raise UserError(f"{where}: the config's model cannot be built ({str(exc).splitlines()[0]})") from None


def _check_tensors(state: Dict[str, torch.Tensor], cfg: ModelConfig, where: str, classifier: bool = False) -> None:
    """Every tensor the config implies is there, floating point, with the implied shape."""
    layers = cfg.n_layers + (cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0)
    if layers > len(state):  # every layer holds tensors: cheap to refuse before building anything
        raise UserError(f"{where}: holds {len(state)} tensors, too few for the config's {layers} layers")
    for name, shape in expected_shapes(cfg, where, classifier).items():
        got = state.get(name)
        if got is None:
            raise UserError(f"{where}: missing tensor '{name}'")
        if tuple(got.shape) != shape:
            raise UserError(f"{where}: tensor '{name}' has shape {tuple(got.shape)}, expected {shape} from the config")
        if not got.is_floating_point():
            raise UserError(f"{where}: tensor '{name}' has dtype {str(got.dtype).replace('torch.', '')}, "
                            "expected a floating-point type")
