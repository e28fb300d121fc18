"""A cluster's own share of its NICs, measured: the ZeRO-3/FSDP rings of a job timed across its
nodes and set against what the planner costs them at the profile's nominal bandwidth.

Why: the planner costs a ring that spans nodes at the NICs' nominal bus bandwidth
(``Efficiency.bus`` of ``nics x nic_bandwidth``); a fabric that reaches less (RoCE congestion,
an oversubscribed spine, fewer rails than GPUs) shows only in a measurement on that cluster. Two
rings are timed, as the layouts issue them:

* ``world``: every rank in one ring, several per node (FSDP/ZeRO-3 over the whole job): the
  node's NICs together carry it (:func:`megallama.profiling.comm.link`);
* ``rail``: one rank per node, all such rings at once (FSDP beside TP inside the node): each
  ring has one GPU's NIC.

For each, an all-gather and a reduce-scatter of ``payload`` bytes (the unsharded tensor, as
:mod:`.comm` counts). The share solves the planner's own time for the measured one
(:func:`share_of`), so a profile carrying it (``cross_node_share``) costs these calls as they ran.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

from megallama.errors import UserError
from megallama.profiling.comm import Collective, collective_time
from megallama.profiling.hardware import HardwareProfile
from megallama.profiling.layout import Layout

OPS = ("all_gather", "reduce_scatter")


@dataclass(frozen=True)
class RingTiming:
    ring: str            # "world" or "rail"
    op: str              # "all_gather" or "reduce_scatter"
    members: int
    per_node: int        # members of the ring on each node
    payload_bytes: int
    seconds: float       # median of the timed calls
    share: float         # of the nominal bus bandwidth the planner costs (1.0: at or above it)

    @property
    def bus_bandwidth(self) -> float:
        """Bytes per second over the ring's ``(n-1)/n`` wire bytes (NCCL-tests' busbw)."""
        return (self.members - 1) / self.members * self.payload_bytes / self.seconds


def share_of(hw: HardwareProfile, members: int, per_node: int, payload: float, seconds: float,
             bus: float) -> float:
    """The ``cross_node_share`` at which the planner's time for one call on a ring of ``members``,
    ``per_node`` on each node (:func:`megallama.profiling.comm.collective_time`: a latency per
    hop, which no share scales, and the bytes at the ring's achievable bandwidth), equals the
    measured ``seconds``; at most 1 (a faster ring is costed at the nominal)."""
    ring = Layout(dp=members, zero=1, gpus_per_node=per_node)
    nominal = collective_time(Collective("dp", "all_gather", payload, 1, "step", "measured"), ring, hw, bus)
    latency = hw.inter_node_latency_s * (members - 1)
    if seconds <= latency:
        return 1.0
    return min(1.0, (nominal - latency) / (seconds - latency))


def node_groups(hosts: Sequence[str]) -> List[List[int]]:
    """Ranks by node, nodes in order of their first rank; every node must hold as many."""
    nodes: Dict[str, List[int]] = {}
    for rank, host in enumerate(hosts):
        nodes.setdefault(host, []).append(rank)
    groups = list(nodes.values())
    if len(groups) < 2:
        raise UserError(f"network: all {len(hosts)} ranks are on one node ({hosts[0]}); the share is of the "
                        f"links between nodes: launch one or more ranks on each of 2+ nodes")
    sizes = sorted({len(g) for g in groups})
    if len(sizes) > 1:
        raise UserError(f"network: nodes hold different numbers of ranks ({', '.join(map(str, sizes))}); "
                        f"launch the same number on each")
    return groups


def _time_op(op: str, group, members: int, payload: int, reps: int, device) -> float:
    import torch
    import torch.distributed as dist

    shard = torch.empty(payload // 2 // members, dtype=torch.bfloat16, device=device)
    full = torch.empty(shard.numel() * members, dtype=torch.bfloat16, device=device)

    def call():
        if op == "all_gather":
            dist.all_gather_into_tensor(full, shard, group=group)
        else:
            dist.reduce_scatter_tensor(shard, full, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()   # the first call sets up the ring's connections
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(hw: HardwareProfile, hosts: Sequence[str], payload: int, reps: int, bus: float, device,
            log=print) -> List[RingTiming]:
    """Every rank calls this (each makes every group, in the same order) and gets the same
    timings: per ring and op, the slowest rank's median (rails run at once, so the slowest rail
    is what a layout waits for)."""
    import torch
    import torch.distributed as dist

    groups = node_groups(hosts)
    rank, per_node = dist.get_rank(), len(groups[0])
    rings = [("world", None, len(hosts), per_node)]
    if per_node > 1:
        rails = [dist.new_group([g[i] for g in groups]) for i in range(per_node)]
        mine = next(i for g in groups for i, r in enumerate(g) if r == rank)
        rings.append(("rail", rails[mine], len(groups), 1))
    calls = [(ring, op) for ring in rings for op in OPS]
    seconds = torch.tensor([_time_op(op, group, members, payload, reps, device)
                            for (_, group, members, _), op in calls], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    out = []
    for ((name, _, members, on_node), op), t in zip(calls, seconds.tolist()):
        sent = payload // 2 // members * members * 2   # whole bf16 shards
        out.append(RingTiming(name, op, members, on_node, sent, t, share_of(hw, members, on_node, sent, t, bus)))
        log(f"network: {name} ring of {members} ({on_node} per node), {op} of {sent / 2 ** 20:.0f} MiB: "
            f"{t * 1e3:.2f} ms, bus {out[-1].bus_bandwidth / 1e9:.2f} GB/s, share {out[-1].share:.2f}")
    return out
