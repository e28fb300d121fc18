"""How many transformer blocks each pipeline stage holds: the one rule training, checkpoints,
``describe``, ``estimate`` and ``plan`` read.

Blocks are contiguous and every stage holds at least one. Four methods:

- ``parameters``: balance parameter counts with the embedding counted on the first stage and the
  head on the last, minimising the heaviest stage (so a large vocabulary costs the end stages a
  block: Llama 3 405B's 126 layers on 16 stages come out 7/8/.../8/7, as Meta ran them);
- ``uniform``: equal block counts; a remainder goes to the stages nearest the middle, since the
  end stages also carry the embedding and the head;
- ``embeddings``: the embedding and the head each counted as one block, block counts balanced
  (Megatron-DeepSpeed's ``--pp-partition-method 'type:transformer|embedding'``, which BLOOM-176B
  ran: 70 blocks on 12 stages as [embed | 5], 6 x 10, [5 | embed] -- bigscience-workshop/bigscience,
  train/tr11-176B-ml/README.md, "Architecture");
- an explicit list (``parallel.pipeline_layers``), taken as given once it adds up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class StageWeights:
    """Parameter counts the ``parameters`` method balances (any consistent unit)."""

    block: float
    first: float = 0.0  # what the first stage holds besides blocks (the embedding)
    last: float = 0.0   # what the last stage holds besides blocks (final norm, head)


PARTITIONS = ("parameters", "uniform", "embeddings")
EMBEDDINGS_AS_LAYERS = StageWeights(block=1.0, first=1.0, last=1.0)


def explicit_problem(counts: Sequence[int], n_layers: int, pp: int,
                     field: str = "parallel.pipeline_layers") -> Optional[str]:
    """A given per-stage list must name every stage, give each a block, and add up to the model."""
    if len(counts) != pp:
        return f"{field}: lists {len(counts)} stages, expected parallel.pp={pp}"
    if any(not isinstance(c, int) or c < 1 for c in counts):
        return f"{field}: every stage needs at least one layer, got {list(counts)}"
    if sum(counts) != n_layers:
        return f"{field}: adds up to {sum(counts)} layers, expected model.n_layers={n_layers}"
    return None


def uniform_split(n_layers: int, pp: int) -> List[int]:
    base, extra = divmod(n_layers, pp)
    middle_first = sorted(range(pp), key=lambda i: (-min(i, pp - 1 - i), i))
    counts = [base] * pp
    for i in middle_first[:extra]:
        counts[i] += 1
    return counts


def balanced_split(n_layers: int, pp: int, w: StageWeights) -> List[int]:
    """Block counts minimising the heaviest stage's parameters; among equal maxima the surplus
    blocks are taken from the heaviest stages first."""
    extras = [w.first if i == 0 else 0.0 for i in range(pp)]
    extras[-1] += w.last
    if w.block <= 0:
        return uniform_split(n_layers, pp)

    def caps(bound: float) -> List[int]:
        return [int((bound - e) // w.block + 1e-9) for e in extras]

    def feasible(bound: float) -> bool:
        cap = caps(bound)
        return min(cap) >= 1 and sum(cap) >= n_layers

    # the optimal bound is some stage's weight at some block count; feasibility grows with the
    # bound, so per stage extra a bisection over the count finds its least feasible bound, in
    # O(log n_layers) checks (a what-if model may have 10**9 layers)
    bounds = []
    for e in sorted(set(extras)):
        lo, hi = 1, n_layers
        if not feasible(hi * w.block + e):
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if feasible(mid * w.block + e):
                hi = mid
            else:
                lo = mid + 1
        bounds.append(lo * w.block + e)
    counts = caps(min(bounds) if bounds else n_layers * w.block + max(extras))
    surplus = sum(counts) - n_layers
    while surplus > 0:  # trim the heaviest stage that can spare a block; middle ones first on ties
        order = sorted((i for i in range(pp) if counts[i] > 1),
                       key=lambda i: (-(counts[i] * w.block + extras[i]), -min(i, pp - 1 - i), i))
        counts[order[0]] -= 1
        surplus -= 1
    return counts


def stage_layers(n_layers: int, pp: int, method: str = "parameters", explicit: Optional[Sequence[int]] = None,
                 weights: Optional[StageWeights] = None) -> List[int]:
    """Blocks per stage; the caller has checked ``1 <= pp <= n_layers`` and any ``explicit`` list."""
    if explicit is not None:
        problem = explicit_problem(explicit, n_layers, pp)
        if problem:
            raise ValueError(problem)
        return list(explicit)
    if not 1 <= pp <= n_layers:
        raise ValueError(f"{n_layers} layers cannot fill {pp} pipeline stages")
    if method == "embeddings":
        return balanced_split(n_layers, pp, EMBEDDINGS_AS_LAYERS)
    if method == "uniform" or weights is None:
        return uniform_split(n_layers, pp)
    if method != "parameters":
        raise ValueError(f"unknown pipeline partition method {method!r}")
    return balanced_split(n_layers, pp, weights)


def stage_of_block(counts: Sequence[int]) -> List[int]:
    """Block index -> the stage that holds it."""
    return [stage for stage, c in enumerate(counts) for _ in range(c)]


def describe_split(counts: Sequence[int]) -> str:
    """``7/8x14/7``-style summary: runs of equal counts collapsed."""
    runs: List[List[int]] = []
    for c in counts:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return "/".join(f"{c}" if n == 1 else f"{c}x{n}" for c, n in runs)
