"""RNG streams that are either shared across TP ranks or distinct per TP rank.

Dropout on replicated activations must draw the same mask on every TP rank (the default
stream); dropout on TP-sharded activations (attention probabilities, sequence-parallel shards)
must draw different masks per rank (the ``model-parallel`` stream). The tracker swaps the
device generator's state in and out so both streams advance independently and can be saved.
The tracker belongs to a :class:`ParallelState` (``state.rng``): seeding and recomputation take
it from there, never from a module global.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Dict, Optional

import torch

if TYPE_CHECKING:
    from megallama.parallel.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


def _device_rng(device: Optional[torch.device] = None):
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state
    return torch.get_rng_state, torch.set_rng_state


class RNGStatesTracker:
    def __init__(self) -> None:
        self.states: Dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        get, set_ = _device_rng()
        saved = get()
        torch.manual_seed(seed) if not torch.cuda.is_available() else torch.cuda.manual_seed(seed)
        self.states[name] = get()
        set_(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise KeyError(f"RNG state '{name}' was never added (call model_parallel_seed first)")
        get, set_ = _device_rng()
        saved = get()
        set_(self.states[name])
        try:
            yield
        finally:
            self.states[name] = get()
            set_(saved)


def model_parallel_seed(state: "ParallelState", seed: int) -> None:
    """Seed the default stream (same on TP ranks, distinct per pipeline stage) and the TP stream
    (``state.rng``), distinct per TP and per Ulysses rank: each holds other heads or positions."""
    default_seed = seed + 100 * state.pp_rank
    torch.manual_seed(default_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(default_seed)
    state.rng.reset()
    state.rng.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + state.tp_rank + state.tp * state.ulysses_rank)


class _Recompute(torch.autograd.Function):
    """Run ``fn`` without saving activations; in backward restore every RNG stream and rerun it."""

    @staticmethod
    def forward(ctx, tracker, fn, *args):
        ctx.tracker, ctx.fn = tracker, fn
        get, _ = _device_rng()
        ctx.cpu_state = torch.get_rng_state()
        ctx.dev_state = get() if torch.cuda.is_available() else None
        ctx.tracker_states = tracker.get_states()
        ctx.save_for_backward(*[a for a in args if torch.is_tensor(a)])
        ctx.is_tensor = [torch.is_tensor(a) for a in args]
        ctx.others = [a for a in args if not torch.is_tensor(a)]
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        saved, others = iter(ctx.saved_tensors), iter(ctx.others)
        args = []
        for is_t in ctx.is_tensor:
            t = next(saved) if is_t else next(others)
            args.append(t.detach().requires_grad_(t.requires_grad) if is_t else t)
        cpu_now = torch.get_rng_state()
        get, set_ = _device_rng()
        dev_now = get() if ctx.dev_state is not None else None
        tracker_now = ctx.tracker.get_states()
        torch.set_rng_state(ctx.cpu_state)
        if ctx.dev_state is not None:
            set_(ctx.dev_state)
        ctx.tracker.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                out = ctx.fn(*args)
        finally:
            torch.set_rng_state(cpu_now)
            if dev_now is not None:
                set_(dev_now)
            ctx.tracker.set_states(tracker_now)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(a.grad if torch.is_tensor(a) else None for a in args)


def checkpoint(tracker: RNGStatesTracker, fn, *args):
    """Activation recomputation that keeps dropout masks identical between the two passes,
    including those drawn from the tensor-parallel RNG stream (``tracker``'s)."""
    return _Recompute.apply(tracker, fn, *args)
