"""Count what a real step sends: wrap ``torch.distributed``'s collectives and attribute each call
to the TP, DP or PP group by the ranks of the group it ran on.

Why wrap the Python functions: our TP layers call ``torch.distributed`` directly and DeepSpeed
calls it through ``deepspeed.comm`` (which looks the functions up at call time, except the
all-gather/reduce-scatter it caches on its backend object; those are wrapped too), so one
wrapper sees every collective of a step, whoever issues it. Bytes follow the convention of
:mod:`megallama.profiling.comm`: the *unsharded* payload (the all-reduced tensor, an
all-gather's output, a reduce-scatter's input, what a send sends), so a measured step compares
group by group with ``collective_bytes_per_step``. A group is named by comparing its ranks with
the given ``ParallelState``'s: ``tp``/``dp``/``pp`` when they match, ``local`` for a group
of one (no bytes move), ``other`` otherwise (DeepSpeed's TPxPP model-parallel group, the world
when two dimensions are > 1). Time is wall time inside the call (and inside ``wait()`` of an
async handle); with ``sync=True`` the CUDA device is synchronised around each call, so queued
kernels are not billed to the collective and the collective's own kernel is.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Callable, Dict, FrozenSet, List, Optional

import torch
import torch.distributed as dist

# name -> how to read (payload bytes, peer rank or None) from the call's arguments
_WRAPPED = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
            "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce",
            "broadcast", "send", "recv", "isend", "irecv", "all_to_all", "all_to_all_single", "gather", "scatter",
            "batch_isend_irecv")
_C10D_PRIVATE = ("_all_gather_base_coalesced",)
OP_NAMES = {"_all_gather_base": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_coalesced":
            "all_gather", "_all_gather_base_coalesced": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
            "_reduce_scatter_base": "reduce_scatter", "all_reduce_coalesced": "all_reduce", "isend": "send",
            "irecv": "recv", "all_to_all_single": "all_to_all"}


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _arg(args, kwargs, i: int, *names: str):
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return args[i] if len(args) > i else None


def _payload(name: str, args, kwargs, group_size: Callable[[Any], int]):
    """(payload bytes, group, peer global rank or None)."""
    group = kwargs.get("group")
    if name in ("all_reduce", "all_reduce_coalesced", "broadcast", "reduce"):
        return _nbytes(_arg(args, kwargs, 0, "tensor", "tensors")), group, None
    if name in ("send", "isend", "recv", "irecv"):
        peer = _arg(args, kwargs, 1, "dst", "src")
        return _nbytes(_arg(args, kwargs, 0, "tensor")), group, peer
    if name == "all_gather":
        return _nbytes(_arg(args, kwargs, 0, "tensor_list")), group, None
    if name in ("all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "_all_gather_base_coalesced"):
        if group is None and len(args) > 2 and not isinstance(args[2], bool):
            group = args[2]
        return _nbytes(_arg(args, kwargs, 0, "output_tensor", "output_tensors", "output")), group, None
    if name in ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single"):
        return _nbytes(_arg(args, kwargs, 1, "input_list", "input", "input_tensor", "input_tensor_list")), group, None
    if name in ("gather", "scatter"):
        t = _arg(args, kwargs, 0, "tensor")
        return _nbytes(t) * group_size(group), group, None
    return 0, group, None


class _TimedWork:
    """An async handle whose ``wait()`` is billed to the collective that returned it."""

    def __init__(self, work, meter: "CommMeter", row: List[float]):
        self._work, self._meter, self._row = work, meter, row

    def wait(self, *a, **k):
        start = self._meter._now()
        try:
            return self._work.wait(*a, **k)
        finally:
            elapsed = self._meter._now() - start
            self._row[2] += elapsed
            self._meter.seconds += elapsed

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommMeter:
    """Context manager: while active, every collective is counted per (group kind, op).

    ``rows[(kind, op)] = [calls, payload_bytes, seconds]``; ``by_group()`` sums them per kind.
    """

    def __init__(self, state, sync: Optional[bool] = None):
        self.state = state
        self.sync = torch.cuda.is_available() if sync is None else sync
        self.rows: Dict[tuple, List[float]] = defaultdict(lambda: [0, 0, 0.0])
        self.seconds = 0.0
        self._saved: List[tuple] = []
        self._ranks: Dict[int, FrozenSet[int]] = {}
        self._local = threading.local()
        self.enabled = True

    # ------------------------------------------------------------------ attribution
    def _group_ranks(self, group) -> FrozenSet[int]:
        key = id(group)
        if key not in self._ranks:
            if group is None or group is dist.GroupMember.WORLD:
                ranks = range(dist.get_world_size())
            else:
                ranks = dist.get_process_group_ranks(group)
            self._ranks[key] = frozenset(ranks)
        return self._ranks[key]

    def kind(self, group, peer: Optional[int] = None) -> str:
        ranks = frozenset((dist.get_rank(), int(peer))) if peer is not None else self._group_ranks(group)
        if len(ranks) <= 1:
            return "local"
        for kind in ("tp", "dp", "pp"):
            if ranks == frozenset(getattr(self.state, f"{kind}_ranks")):
                return kind
        if peer is not None and ranks <= frozenset(self.state.pp_ranks):
            return "pp"
        return "other"

    # ------------------------------------------------------------------ wrapping
    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _wrap(self, name: str, fn: Callable) -> Callable:
        meter = self

        def wrapped(*args, **kwargs):
            if getattr(meter._local, "depth", 0) or not meter.enabled:
                return fn(*args, **kwargs)
            if name == "batch_isend_irecv":
                return meter._batch(fn, *args, **kwargs)
            nbytes, group, peer = _payload(name, args, kwargs, lambda g: len(meter._group_ranks(g)))
            row = meter.rows[(meter.kind(group, peer), OP_NAMES.get(name, name))]
            meter._local.depth = 1
            start = meter._now()
            try:
                out = fn(*args, **kwargs)
            finally:
                meter._local.depth = 0
                elapsed = meter._now() - start
                meter.seconds += elapsed
                row[0] += 1
                row[1] += nbytes
                row[2] += elapsed
            return _TimedWork(out, meter, row) if out is not None and hasattr(out, "wait") else out

        wrapped.__wrapped__ = fn
        return wrapped

    def _batch(self, fn, ops, *args, **kwargs):
        rows = []
        for op in ops:
            name = getattr(getattr(op.op, "__wrapped__", op.op), "__name__", "send")
            row = self.rows[(self.kind(op.group, op.peer), OP_NAMES.get(name, name))]
            row[0] += 1
            row[1] += _nbytes(op.tensor)
            rows.append(row)
        self._local.depth = 1
        start = self._now()
        try:
            works = fn(ops, *args, **kwargs)
        finally:
            self._local.depth = 0
            elapsed = self._now() - start
            self.seconds += elapsed
            rows[0][2] += elapsed if rows else 0.0
        return [_TimedWork(w, self, rows[0]) for w in works] if rows else works

    def __enter__(self) -> "CommMeter":
        from torch.distributed import distributed_c10d as c10d

        targets = [(dist, n) for n in _WRAPPED if hasattr(dist, n)]
        targets += [(c10d, n) for n in _C10D_PRIVATE if hasattr(c10d, n)]
        for obj, name in targets:
            self._patch(obj, name, name)
        from megallama.train.deepspeed_patches import cached_comm_functions

        for obj, attr, name in cached_comm_functions():
            self._patch(obj, attr, name)
        return self

    def _patch(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        self._saved.append((obj, attr, fn))
        setattr(obj, attr, self._wrap(name, fn))

    def __exit__(self, *exc) -> None:
        for obj, attr, fn in reversed(self._saved):
            setattr(obj, attr, fn)
        self._saved.clear()

    # ------------------------------------------------------------------ results
    def reset(self) -> None:
        self.rows.clear()
        self.seconds = 0.0

    def by_group(self) -> Dict[str, Dict[str, float]]:
        """Per group kind: ``calls``, ``payload_bytes``, ``seconds``."""
        out: Dict[str, Dict[str, float]] = {}
        for (kind, _), (calls, nbytes, secs) in self.rows.items():
            row = out.setdefault(kind, {"calls": 0, "payload_bytes": 0, "seconds": 0.0})
            row["calls"] += calls
            row["payload_bytes"] += nbytes
            row["seconds"] += secs
        return out

    def table(self) -> List[Dict[str, Any]]:
        return [{"group": k, "op": op, "calls": c, "payload_bytes": b, "seconds": s}
                for (k, op), (c, b, s) in sorted(self.rows.items())]


def measure_link(group=None, reps: int = 5, nbytes: int = 4 << 20) -> Dict[str, float]:
    """This group's collective link, measured (all its ranks must call): per-step latency from an
    8-byte all-reduce and bus bandwidth (a ring all-reduce's ``2(n-1)/n`` wire bytes per
    second) from a ``nbytes`` one; the CPU profile's assumed figures mean little for gloo."""
    n = dist.get_world_size(group)
    steps = 2 * (n - 1)

    def best(t: torch.Tensor) -> float:
        dist.all_reduce(t, group=group)
        times = []
        for _ in range(reps):
            dist.barrier(group=group)
            start = time.perf_counter()
            dist.all_reduce(t, group=group)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    small = best(torch.zeros(2, device=device))
    big = best(torch.zeros(nbytes // 4, device=device))
    wire = steps / n * nbytes
    return {"latency_s": small / steps, "bus_bandwidth": wire / max(big - small, 1e-9), "ranks": n}
