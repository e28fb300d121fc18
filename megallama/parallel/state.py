"""The one source of truth for parallel layout: TP, PP and DP groups carved from the world.

Rank order is :mod:`megallama.config.topology`'s (TP innermost, then Ulysses, then DP, then PP),
without Ulysses the order of DeepSpeed's ``PipeModelDataParallelTopology``, so its pipeline grid
and our groups agree.
The :class:`ParallelState` object doubles as the ``mpu`` DeepSpeed asks for. There is no global
copy: whoever builds a model passes it the state, and each layer keeps what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional

import torch.distributed as dist

from megallama.config.layout_rules import world_problem
from megallama.config.topology import ParallelDims
from megallama.parallel.random import RNGStatesTracker


@dataclass(frozen=True)
class TPGroup:
    """What a tensor-parallel layer or mapping needs of the layout: its size, rank and group."""

    size: int = 1
    rank: int = 0
    group: Optional[object] = field(default=None, repr=False)


@dataclass
class ParallelState:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: Optional[object] = field(default=None, repr=False)
    pp_group: Optional[object] = field(default=None, repr=False)
    dp_group: Optional[object] = field(default=None, repr=False)
    tp_ranks: List[int] = field(default_factory=lambda: [0])
    pp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_ranks: List[int] = field(default_factory=lambda: [0])
    sequence_parallel: bool = False
    ulysses: int = 1
    ulysses_group: Optional[object] = field(default=None, repr=False)
    # data x Ulysses ranks: ZeRO partitions over them and DeepSpeed reduces gradients over them
    seq_dp_group: Optional[object] = field(default=None, repr=False)
    # size -> the group of that many consecutive TP ranks holding this rank (KV heads shared by them)
    tp_subgroups: Dict[int, object] = field(default_factory=dict, repr=False)
    # the dropout streams of this layout; DeepSpeed's tracker replaces it under its recomputation
    rng: RNGStatesTracker = field(default_factory=RNGStatesTracker, repr=False, compare=False)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(tp=self.tp, pp=self.pp, dp=self.dp, ulysses=self.ulysses)

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def ulysses_rank(self) -> int:
        return self.dims.ulysses_rank(self.rank)

    @property
    def ulysses_parallel(self) -> TPGroup:
        """The group one sequence is split over (DeepSpeed-Ulysses); size 1 when off."""
        return TPGroup(self.ulysses, self.ulysses_rank, self.ulysses_group)

    @property
    def tensor_parallel(self) -> TPGroup:
        return TPGroup(self.tp, self.tp_rank, self.tp_group)

    def tp_replicas(self, size: int) -> TPGroup:
        """The ``size`` consecutive TP ranks holding this one: a head replicated over them (fewer
        heads than TP ranks) is broadcast from, and its gradient reduced onto, the first."""
        if size < 1 or self.tp % size:
            raise ValueError(f"{size} ranks do not divide tensor-parallel size {self.tp}")
        if size == self.tp:
            return self.tensor_parallel
        return TPGroup(size, self.tp_rank % size, self.tp_subgroups.get(size))

    @property
    def sp_group(self) -> Optional[TPGroup]:
        """The group a sequence-parallel activation is sharded over; None without SP."""
        return self.tensor_parallel if self.sequence_parallel else None

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # ---- the mpu interface DeepSpeed (ZeRO, checkpointing, pipeline) calls -------------------
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank - self.tp_rank

    # DeepSpeed's sequence-parallel hooks: with them it partitions ZeRO state over, and reduces
    # gradients over, data x Ulysses ranks, summing (not averaging) over the Ulysses ones; each
    # Ulysses rank's loss is therefore the whole sequence's (megallama.parallel.ulysses)
    def get_sequence_parallel_group(self):
        return self.ulysses_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.ulysses

    def get_sequence_parallel_rank(self) -> int:
        return self.ulysses_rank

    def get_sequence_data_parallel_group(self):
        return self.seq_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp * self.ulysses

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dp_rank * self.ulysses + self.ulysses_rank


_GROUP_TIMEOUT: Optional[timedelta] = None


def set_group_timeout(seconds: float) -> None:
    """The bound on every wait in a group made from now on (``train.dist_timeout_s``).

    torch gives ``new_group`` its own 30-minute default rather than the world group's timeout,
    so the bound is passed to our groups and becomes torch's default for DeepSpeed's (pipeline
    grid, ZeRO) too: a stopped peer ends every wait within it, watchdog or not."""
    from torch.distributed import distributed_c10d as c10d

    global _GROUP_TIMEOUT
    _GROUP_TIMEOUT = timedelta(seconds=seconds)
    c10d.default_pg_timeout = _GROUP_TIMEOUT
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = _GROUP_TIMEOUT


def initialize(tp: int = 1, pp: int = 1, sequence_parallel: bool = False, ulysses: int = 1) -> ParallelState:
    """Build every group from the initialised default process group (all ranks must call)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    problem = world_problem(world, {"tp": tp, "pp": pp, "ulysses": ulysses})
    if problem:
        raise ValueError(problem)
    dp = world // (tp * pp * ulysses)
    state = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, sequence_parallel=sequence_parallel and tp > 1,
                          ulysses=ulysses)
    if not dist.is_initialized():
        return state

    def make(ranks_list: List[List[int]]):
        # every rank must create every group, in the same order
        mine_group, mine_ranks = None, None
        for ranks in ranks_list:
            g = dist.new_group(ranks, timeout=_GROUP_TIMEOUT)
            if rank in ranks:
                mine_group, mine_ranks = g, ranks
        return mine_group, mine_ranks

    dims = state.dims
    state.tp_group, state.tp_ranks = make(dims.groups("tp"))
    state.dp_group, state.dp_ranks = make(dims.groups("dp"))
    state.pp_group, state.pp_ranks = make(dims.groups("pp"))
    if ulysses > 1:
        state.ulysses_group = make(dims.groups("ulysses"))[0]
        state.seq_dp_group = make(dims.groups("dp", "ulysses"))[0]
    else:
        state.seq_dp_group = state.dp_group
    # the sub-groups of every proper divisor of tp, for whatever model is built on this layout
    # (every rank must make every group; there are few: tp 16 makes three sets)
    for size in (d for d in range(2, tp) if tp % d == 0):
        state.tp_subgroups[size] = make([ranks[i:i + size] for ranks in dims.groups("tp")
                                         for i in range(0, tp, size)])[0]
    return state
