"""The one gate before any unpickling of a checkpoint.

DeepSpeed reads its own files with an unrestricted ``torch.load``, which runs whatever a crafted
pickle asks for. Before it does, every file under the checkpoint (any depth: ``zero/``, layer
files, RNG states) must load with ``weights_only``, allowing only the plain records DeepSpeed
itself pickles; the first that does not is refused in one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from megallama.errors import UserError


def deepspeed_record_types() -> list:
    """Plain records DeepSpeed pickles into its own files (enums, loss-scaler state, fragment
    addresses): rebuilt from their fields, never by running code from the file."""
    import importlib

    names = {"deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler", "LossScalerBase"),
             "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
             "deepspeed.utils.tensor_fragment": ("fragment_address",)}
    found = []
    for module, classes in names.items():
        mod = importlib.import_module(module)
        found += [getattr(mod, n) for n in classes]
    return found


def _files_under(tag_dir: Path) -> List[Path]:
    """Every file below ``tag_dir``; a linked directory (which a loader would follow out of the
    checkpoint, or round in a loop) is refused."""
    found = []
    for root, dirs, files in os.walk(tag_dir):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                raise UserError(f"{os.path.join(root, d)}: a linked directory inside a checkpoint; refusing to "
                                "load it")
        found += [Path(root) / f for f in files]
    return sorted(found)


NEVER_UNPICKLED = (".json", ".safetensors")  # parsed as data by their readers, never unpickled


def check_safe_to_unpickle(tag_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Every file under ``tag_dir`` that a loader could unpickle loads weights-only, or one line.
    ``rank`` of ``world`` checks every ``world``-th file (in sorted order), so the ranks of a job
    share the check instead of one rank opening every file while the others wait."""
    from megallama.checkpoint.safe_pickle import load_weights_only, refusal_reason

    allowed = deepspeed_record_types()
    for path in _files_under(tag_dir)[rank::world]:
        if path.suffix in NEVER_UNPICKLED:
            continue
        try:
            try:  # mapped, so a large or sparse file costs no memory
                load_weights_only(path, allowed, mmap=True)
            except RuntimeError as exc:  # the legacy (non-zip) format cannot be mapped
                if "mmap" not in str(exc):
                    raise
                load_weights_only(path, allowed)
        except Exception as exc:  # UnpicklingError and friends: report, never execute
            raise UserError(f"{path}: refusing to unpickle it: it holds objects beyond tensors and plain data "
                            f"({refusal_reason(exc)})") from None
