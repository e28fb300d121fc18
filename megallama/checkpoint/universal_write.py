"""The one writer of a training checkpoint from whole tensors: ``latest`` + one tag whose
``universal/`` holds the layout-free form (:mod:`megallama.train.universal`) at TP=1 x PP=1.

Every import that starts training from elsewhere writes through it (consolidated weights and
Megatron's Adam state via :func:`megallama.checkpoint.reshard.from_state`, torchtitan's DCP,
DeepSpeed's universal checkpoint), so the tag and file names, the layout and meta records and the
staging cannot drift apart. Tensors stream one at a time; another layout is a reshard of it.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from megallama.checkpoint.staging import staged_dir
from megallama.checkpoint.streaming import Lazy, Tensorish

STEM = "pp00-tp00"  # the one shard of TP=1 x PP=1


def with_moments(weights: Mapping[str, Tensorish], moments: Optional[Mapping[str, Mapping[str, Tensorish]]] = None
                 ) -> Dict[str, Tensorish]:
    """Each weight in fp32 followed by its Adam moments (``name::exp_avg``, ``name::exp_avg_sq``):
    ``moments[key][name]``, or without them zeros (a fresh optimizer) made only as they are written."""
    from megallama.train.universal import MOMENTS

    tensors: Dict[str, Tensorish] = {}
    for name, w in weights.items():
        tensors[name] = w.to(torch.float32)
        for key in MOMENTS:
            tensors[f"{name}::{key}"] = (moments[key][name].to(torch.float32) if moments
                                         else Lazy(w.shape, torch.float32, _zeros(tuple(w.shape))))
    return tensors


def _zeros(shape: Tuple[int, ...]):
    return lambda start, stop: torch.zeros((stop - start,) + shape[1:])


def _stored(t: Tensorish, info: Dict) -> Tensorish:
    """A padded vocabulary as a TP=1 run stores it: with its zero rows (dim 0, the only one padded)."""
    from megallama.checkpoint.streaming import cat
    from megallama.config.layout_rules import padded_vocab

    extra = padded_vocab(t.shape[0], 1, info.get("pad_multiple")) - t.shape[0]
    return cat([t, Lazy((extra,) + tuple(t.shape[1:]), t.dtype, _zeros(tuple(t.shape)))]) if extra else t


def write_training_checkpoint(out, cfg, tensors: Mapping[str, Tensorish], *, step: int, consumed_samples: int,
                              record: Optional[Dict] = None, source: Optional[Tuple[str, object]] = None,
                              tp: int = 1, pp: int = 1) -> Path:
    """``tensors`` (as :func:`with_moments` names them) as a training checkpoint at ``step``.
    ``record``: the source run's layout meta (its schedule, ...), kept; ``source``: ``(format, path)``
    recorded as ``converted_from``. Written whole or not at all; at another ``tp`` x ``pp``, resharded
    from a TP=1 copy staged beside ``out``. The caller has decided that ``out`` may be replaced."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    direct = (tp, pp) == (1, 1)
    staging = staged_dir(out) if direct else tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent)
    with staging as tmp:
        _write(Path(tmp), cfg, tensors, step, consumed_samples, record, source)
        if not direct:
            from megallama.checkpoint.reshard import reshard

            reshard(tmp, out, tp, pp, overwrite=True)
    return out


def _write(root: Path, cfg, tensors, step: int, consumed: int, record: Optional[Dict],
           source: Optional[Tuple[str, object]]) -> None:
    from megallama.checkpoint.streaming import write_safetensors
    from megallama.config.pipeline_split import stage_layers
    from megallama.train import checkpoint as ckpt
    from megallama.train.universal import _expected

    tag = root / ckpt.tag_for(step)
    (tag / "universal").mkdir(parents=True)
    index = _expected(cfg)[1]
    write_safetensors(tag / "universal" / f"{STEM}.safetensors",
                      {name: _stored(t, index.get(name.partition("::")[0], {})) for name, t in tensors.items()})
    (tag / "universal" / f"{STEM}.index.json").write_text(json.dumps(index))
    layout = {"model": cfg.model_dump(), **(record or {}), "tp": 1, "pp": 1, "dp": None, "zero": None,
              "stage_layers": stage_layers(cfg.n_layers, 1)}
    if source is not None:
        layout["converted_from"] = {"format": source[0], "path": str(source[1])}
    (tag / "universal" / "layout.json").write_text(json.dumps(layout))
    (tag / "meta.json").write_text(json.dumps({**layout, "step": step, "consumed_samples": consumed}, indent=1))
    ckpt.write_manifest(tag)
    (root / ckpt.LATEST).write_text(tag.name)
