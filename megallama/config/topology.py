"""The rank order of a TP x DP x PP grid, written once (no torch: the cost models read it too).

TP is innermost, then DP, then PP: ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``, the
order of DeepSpeed's ``PipeModelDataParallelTopology``, so its pipeline grid and our groups
agree, and a TP group stays inside a node when ``tp <= gpus_per_node``.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import List, Tuple

AXES = ("pp", "dp", "tp")   # outermost first


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of one layout (and whether TP ranks also split the sequence)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def group(self, rank: int, *axes: str) -> List[int]:
        """The ranks that differ from ``rank`` only along ``axes`` (e.g. ``"tp"``, or ``"pp", "tp"``)."""
        if not axes or set(axes) - set(AXES):
            raise ValueError(f"unknown group axes {axes!r}; expected some of {AXES}")
        at = dict(zip(("tp", "dp", "pp"), self.coords(rank)))
        varying = [a for a in AXES if a in axes]
        members = []
        for inner in product(*(range(getattr(self, a)) for a in varying)):
            at.update(zip(varying, inner))
            members.append(self.rank(at["tp"], at["dp"], at["pp"]))
        return members

    def groups(self, *axes: str) -> List[List[int]]:
        """Every group along ``axes``, in one fixed order: each rank must create every group, and
        in the same order."""
        fixed = [a for a in AXES if a not in axes]
        out = []
        for outer in product(*(range(getattr(self, a)) for a in fixed)):
            at = {"tp": 0, "dp": 0, "pp": 0, **dict(zip(fixed, outer))}
            out.append(self.group(self.rank(at["tp"], at["dp"], at["pp"]), *axes))
        return out
