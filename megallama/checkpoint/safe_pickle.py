"""``torch.load(weights_only=True)`` whose refusals read as one line of ours.

torch's weights-only refusal comes with advice meant for trusted files (re-run with
``weights_only=False``, "please file an issue") and, for pickle protocols other than 2, a
warning printed before the error. For an untrusted file that advice is wrong and the warning is
noise: the loaders say only which file was refused and what it held.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load",
           "In PyTorch 2.6", "(1)", "(2)", "Re-running `torch.load`")


def load_weights_only(path, allowed: Iterable[type] = (), **kwargs: Any) -> Any:
    """``torch.load`` of tensors and plain data (plus the ``allowed`` record types), silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Detected pickle protocol N ... please file an issue"
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(str(path), map_location="cpu", weights_only=True, **kwargs)


def refusal_reason(exc: BaseException) -> str:
    """What the unpickler refused (``Unsupported operand 149``, ``... GLOBAL posix.system ...``),
    without torch's advice; the exception's type name when it says nothing more."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    for line in (ln.strip() for ln in text.splitlines()):
        if line and not line.startswith(_ADVICE):
            return line.rstrip(".")[:200]
    return type(exc).__name__
