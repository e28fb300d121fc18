"""The rank order of a TP x Ulysses x DP x PP grid, written once (no torch: the cost models read it too).

TP is innermost, then Ulysses (sequence shards), then DP, then PP:
``rank = ((pp_rank * dp + dp_rank) * ulysses + u_rank) * tp + tp_rank``. Without Ulysses this is
the order of DeepSpeed's ``PipeModelDataParallelTopology``, so its pipeline grid and our groups
agree (Ulysses and the pipeline are not combined); a TP group, then a Ulysses group, stays inside
a node when it fits: the two all-to-all/all-reduce heavy groups get the fastest links.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import List, Tuple

AXES = ("pp", "dp", "ulysses", "tp")   # outermost first


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of one layout (and whether TP ranks also split the sequence)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    ulysses: int = 1  # ranks the sequence is split over for the whole block (DeepSpeed-Ulysses)

    @property
    def world_size(self) -> int:
        return self.tp * self.ulysses * self.pp * self.dp

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int, ulysses_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.ulysses + ulysses_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of a global rank (:meth:`ulysses_rank` the fourth)."""
        inner = self.tp * self.ulysses
        return rank % self.tp, (rank // inner) % self.dp, rank // (inner * self.dp)

    def ulysses_rank(self, rank: int) -> int:
        return (rank // self.tp) % self.ulysses

    def _at(self, rank: int) -> dict:
        tp, dp, pp = self.coords(rank)
        return {"tp": tp, "dp": dp, "pp": pp, "ulysses": self.ulysses_rank(rank)}

    def group(self, rank: int, *axes: str) -> List[int]:
        """The ranks that differ from ``rank`` only along ``axes`` (e.g. ``"tp"``, or ``"pp", "tp"``)."""
        if not axes or set(axes) - set(AXES):
            raise ValueError(f"unknown group axes {axes!r}; expected some of {AXES}")
        at = self._at(rank)
        varying = [a for a in AXES if a in axes]
        members = []
        for inner in product(*(range(getattr(self, a)) for a in varying)):
            at.update(zip(varying, inner))
            members.append(self.rank(at["tp"], at["dp"], at["pp"], at["ulysses"]))
        return members

    def groups(self, *axes: str) -> List[List[int]]:
        """Every group along ``axes``, in one fixed order: each rank must create every group, and
        in the same order."""
        fixed = [a for a in AXES if a not in axes]
        out = []
        for outer in product(*(range(getattr(self, a)) for a in fixed)):
            at = {"tp": 0, "dp": 0, "pp": 0, "ulysses": 0, **dict(zip(fixed, outer))}
            out.append(self.group(self.rank(at["tp"], at["dp"], at["pp"], at["ulysses"]), *axes))
        return out
