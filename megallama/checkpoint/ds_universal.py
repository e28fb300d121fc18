"""DeepSpeed's universal checkpoint (the output of its ``ds_to_universal``) as a starting point.

The directory holds ``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`` (each a full tensor, merged over
ZeRO and TP) beside DeepSpeed's model-states files, which carry our ``universal_checkpoint_info``
(the run's model config under ``megallama``, :mod:`megallama.checkpoint.ds_universal_info`) and
the step and data position we saved. Names are DeepSpeed's: the model's own, or under a pipeline
with a layer index or tied-layer key in front. Every file loads weights-only (DeepSpeed's plain
records allow-listed) and is checked against the shape the config implies before anything is
used, so a damaged or hostile directory is one line naming the file. The reader offers
:class:`~megallama.train.universal.UniversalReader`'s interface, so ``checkpoint.load`` resumes
from it at any layout and ``convert --from ds-universal`` writes our own training checkpoint
from it, tensor by tensor (a block of rows resident at a time, files memory-mapped).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

from megallama.errors import UserError

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, 3
FILES = {None: "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
_PREFIX = re.compile(r"^(?:\d+\.|tied_modules\.[^.]+\.)")  # DeepSpeed's pipeline layer index or tied key


def is_ds_universal(path) -> bool:
    p = Path(path)
    return (p / "zero").is_dir() and any((p / f).is_file() for f in MODEL_STATES)


def find_ds_universal(path) -> Optional[Path]:
    """``path`` if it is a DeepSpeed universal directory, or the one its ``latest_universal`` names
    (ds_to_universal writes that pointer beside its output); else None."""
    p = Path(path)
    if is_ds_universal(p):
        return p
    pointer = p / "latest_universal"
    if pointer.is_file() and pointer.stat().st_size < 256:
        name = pointer.read_text(errors="replace").strip()
        if name and not any(c in name for c in "/\\") and name not in (".", "..") and is_ds_universal(p / name):
            return p / name
    return None


def _load(path: Path):
    """``torch.load`` weights-only and memory-mapped; DeepSpeed's plain records allowed."""
    from deepspeed.checkpoint import SubparamShape

    from megallama.checkpoint.safe_pickle import load_weights_only, refusal_reason
    from megallama.train.unpickle_gate import deepspeed_record_types

    allowed = deepspeed_record_types() + [SubparamShape]
    try:
        try:
            return load_weights_only(path, allowed, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be mapped
            if "mmap" not in str(exc):
                raise
            return load_weights_only(path, allowed)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (a DeepSpeed universal checkpoint has one per state of a "
                        "parameter)") from None
    except Exception as exc:  # a refused pickle or a damaged file: report, never execute
        raise UserError(f"{path}: refusing to unpickle it: not tensors and plain data ({refusal_reason(exc)})") \
            from None


def _count(value, what: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: '{what}' must be a non-negative integer, got {value!r}"[:300])
    return value


class DsUniversalReader:
    """Full logical fp32 tensors (weights, Adam moments) out of a DeepSpeed universal directory."""

    def __init__(self, src):
        from megallama.checkpoint.ds_universal_info import MEGALLAMA
        from megallama.checkpoint.safe_read import model_config
        from megallama.train.universal import _expected

        self.src = Path(src)
        states = next((self.src / f for f in MODEL_STATES if (self.src / f).is_file()), None)
        if states is None or not (self.src / "zero").is_dir():
            raise UserError(f"{self.src}: not a DeepSpeed universal checkpoint (expected zero/ and "
                            f"{MODEL_STATES[0]}, as ds_to_universal writes)")
        sd = _load(states)
        info = sd.get("universal_checkpoint_info") if isinstance(sd, dict) else None
        meta = info.get(MEGALLAMA) if isinstance(info, dict) else None
        if not isinstance(meta, dict):
            raise UserError(f"{states}: its universal_checkpoint_info has no megallama run record (a checkpoint "
                            "saved by megallama carries one; this one was made elsewhere)")
        self.cfg = model_config(meta.get("model"), str(states))
        if not isinstance(meta.get("schedule", {}), dict):
            raise UserError(f"{states}: the megallama run record's 'schedule' must be an object")
        self.meta = {**meta, "step": _count(sd.get("step"), "step", states),
                     "consumed_samples": _count(sd.get("consumed_samples"), "consumed_samples", states)}
        self.layout = {**meta, "tp": 1, "pp": 1}  # every tensor whole: as our form written at TP=1
        self.shapes, self.index = _expected(self.cfg)
        self.dirs: Dict[str, Path] = {}
        for d in sorted(p for p in (self.src / "zero").iterdir() if p.is_dir()):
            if d.is_symlink():  # a loader would follow it out of the checkpoint
                raise UserError(f"{d}: a linked directory inside a checkpoint; refusing to load it")
            name = _PREFIX.sub("", d.name)
            if name not in self.shapes or name in self.dirs:
                raise UserError(f"{d}: parameter {d.name[:100]!r} is " + ("stored twice" if name in self.dirs
                                else "not in the model its checkpoint's config describes"))
            self.dirs[name] = d
        missing = [n for n in self.shapes if n not in self.dirs]
        if missing:
            raise UserError(f"{self.src / 'zero' / missing[0]}: missing (parameter '{missing[0]}' of the model)")
        files = [self._path(n, k) for n in self.shapes for k in FILES]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: not found (a DeepSpeed universal checkpoint has one per state of a "
                                "parameter)")
        for name in self.shapes:  # every file holds the tensor the config implies, before anything is used
            for key in FILES:
                self.full(name, key)

    def _path(self, name: str, key: Optional[str]) -> Path:
        return self.dirs[name] / f"{FILES[key]}.pt"

    def names(self) -> Iterator[str]:
        return iter(self.shapes)

    def full(self, name: str, key: str = None) -> torch.Tensor:
        if name not in self.dirs:
            raise UserError(f"{self.src}: parameter '{name}' missing from the checkpoint")
        path, shape = self._path(name, key), self.shapes[name]
        limit = 8 * math.prod(shape) + (1 << 20)  # fp64 at most, plus the pickle's records
        if path.stat().st_size > limit:
            raise UserError(f"{path}: {path.stat().st_size} bytes, more than parameter '{name}' {shape} holds")
        obj = _load(path)
        t = obj.get("param") if isinstance(obj, dict) else obj  # ZeRO-3 at TP=1 stores the bare flat tensor
        if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) not in (shape, (math.prod(shape),)):
            got = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            raise UserError(f"{path}: holds {got}, expected a float tensor of shape {shape}")
        return t.reshape(shape).float()


def open_ds_universal(path):
    """``(config, lazy fp32 weights)``: every file checked, each tensor read when written."""
    reader = DsUniversalReader(find_ds_universal(path) or path)
    return reader.cfg, {n: _lazy(reader, n, None) for n in reader.names()}


def _lazy(reader: DsUniversalReader, name: str, key: Optional[str]):
    from megallama.checkpoint.streaming import Lazy

    return Lazy(reader.shapes[name], torch.float32, lambda a, b: reader.full(name, key)[a:b])


def convert(src, out, overwrite: bool = False) -> Path:
    """A megallama training checkpoint (layout-free, TP=1) holding the weights, Adam moments, step
    and data position of a DeepSpeed universal directory, streamed; a failure leaves nothing behind."""
    from megallama.checkpoint.universal_write import with_moments, write_training_checkpoint

    reader = DsUniversalReader(find_ds_universal(src) or src)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    names = list(reader.names())
    moments = {k: {n: _lazy(reader, n, k) for n in names} for k in FILES if k is not None}
    write_training_checkpoint(out, reader.cfg, with_moments({n: _lazy(reader, n, None) for n in names}, moments),
                              step=reader.meta["step"], consumed_samples=reader.meta["consumed_samples"],
                              record=reader.layout, source=("ds-universal", src))
    n = sum(math.prod(s) for s in reader.shapes.values())
    print(f"{out}: megallama training checkpoint at step {reader.meta['step']}, {n:,} parameters with Adam moments, "
          f"from ds-universal {src}; train from it with --set checkpoint.load={out}")
    return out
