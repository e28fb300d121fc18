"""Measure, on a real step, what the activation model predicts: the tensors autograd saves (and
peak device memory on GPU). Model states: :mod:`measure_states`; collectives: :mod:`measure_comm`.

Why count storages rather than read a memory profiler: on CPU there is no allocator peak, and
even on GPU an allocator figure mixes everything together. Counting *distinct storages* (a view
keeps its whole base alive and is counted once, at the base's size) attributes bytes to the
model's components exactly, on any device. :class:`SavedTensorMeter` hooks
``torch.autograd.graph.saved_tensors_hooks``: every saved tensor is wrapped in a holder whose
lifetime is the saved tensor's, so the meter knows the live saved bytes at any moment (end of
forward, the 1F1B peak, a recomputed block's working set in backward).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

SMALL = 16   # bytes: 0-d scalars (step counters, the loss's token count) are not activations/states


def storage_key(t: torch.Tensor) -> Tuple[str, int, int]:
    return t.device.type, t.device.index or 0, t.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------ activations
class _Held:
    """What autograd keeps instead of the tensor: releasing it releases the meter's count."""

    __slots__ = ("t", "meter", "key")

    def __init__(self, t, meter, key):
        self.t, self.meter, self.key = t, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Live bytes of the distinct storages autograd saves while the context is active.

    ``exclude``: modules whose parameters and constant tables (RoPE's ``_cache``) are not
    activations. ``mark(name)`` records the live bytes now; ``peak`` is the maximum seen.
    Storages first saved while ``in_backward`` is set (recomputation) are also summed on their
    own (``backward_peak``: the largest recompute working set). :meth:`track` counts tensors a
    custom function keeps outside autograd's saved-tensor mechanism (DeepSpeed's checkpoint
    keeps its inputs as ``ctx.deepspeed_saved_tensors``) until the tensor object dies.
    """

    def __init__(self, *exclude: torch.nn.Module):
        self.exclude = exclude
        self.live = self.peak = self.backward_live = self.backward_peak = 0
        self.marks: Dict[str, int] = {}
        self.in_backward = False
        self._count: Dict[Any, List[int]] = {}    # storage -> [references, bytes, born in backward]
        self._skip: Set[Any] = set()
        self._ctx = None

    def _skip_keys(self) -> Set[Any]:
        skip = set()
        for module in self.exclude:
            for p in module.parameters():
                skip.add(storage_key(p))
            for m in module.modules():
                for pair in getattr(m, "_cache", {}).values():
                    skip |= {storage_key(t) for t in pair}
        return skip

    def _acquire(self, t: torch.Tensor):
        """The storage key now counted for ``t``, or None when ``t`` is not an activation."""
        if isinstance(t, torch.nn.Parameter) or t.device.type == "meta":
            return None
        key = storage_key(t)
        nbytes = t.untyped_storage().nbytes()
        if nbytes <= SMALL or key in self._skip:
            return None
        entry = self._count.get(key)
        if entry is not None:
            entry[0] += 1
            return key
        self._count[key] = [1, nbytes, self.in_backward]
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        if self.in_backward:
            self.backward_live += nbytes
            self.backward_peak = max(self.backward_peak, self.backward_live)
        return key

    def _release(self, key) -> None:
        entry = self._count.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._count[key]
            self.live -= entry[1]
            if entry[2]:
                self.backward_live -= entry[1]

    def _pack(self, t: torch.Tensor):
        key = self._acquire(t)
        return t if key is None else _Held(t, self, key)

    @staticmethod
    def _unpack(x):
        return x.t if isinstance(x, _Held) else x

    def track(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                # partition_activations swaps the input's data for an empty tensor, keeping the
                # partition as ``saved_data``
                kept = getattr(t, "saved_data", None)
                for x in (t,) if kept is None else (kept,):
                    key = self._acquire(x)
                    if key is not None:
                        weakref.finalize(t, self._release, key)

    def mark(self, name: str) -> int:
        self.marks[name] = max(self.marks.get(name, 0), self.live)
        return self.live

    def __enter__(self) -> "SavedTensorMeter":
        self._skip = self._skip_keys()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


@contextmanager
def tracking_checkpoints(module: torch.nn.Module, meter: SavedTensorMeter):
    """Let ``meter`` see what DeepSpeed's activation checkpointing keeps: wrap the checkpoint
    function of every block (``checkpoint_fn``), in a model or a pipeline stage alike."""
    undo = []

    def wrap(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            first = out[0] if isinstance(out, (tuple, list)) else out
            meter.track(getattr(getattr(first, "grad_fn", None), "deepspeed_saved_tensors", None) or ())
            return out
        return run

    for m in module.modules():
        fn = vars(m).get("checkpoint_fn")
        if fn is not None:
            m.checkpoint_fn = wrap(fn)
            undo.append((m, fn))
    try:
        yield meter
    finally:
        for m, fn in undo:
            m.checkpoint_fn = fn


# ------------------------------------------------------------------------------- device peak
def reset_device_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_peak_bytes() -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` on GPU; None on CPU (no allocator peak to read)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
