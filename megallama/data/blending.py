"""Weighted blending of several datasets, computable at any position in O(block).

Megatron assigns sample after sample greedily, which needs the whole history to know where
sample ``i`` comes from. Here positions are grouped into blocks of ``B``; the number of samples
each dataset has received by the start of block ``b`` is a closed-form apportionment of
``b * B`` by the weights (floors plus largest remainders), and inside a block the datasets are
interleaved in a seeded random order. So any position resolves without history (a resumed run
pays nothing to skip ahead), each dataset's share after ``n`` samples is within ``B`` samples
of ``weight * n``, and every component is read sequentially (its own epochs and shuffle apply).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence, Tuple

import numpy as np

from megallama.data.packing import seed_rng


class BlendedDataset:
    """``ds[i]`` is sample ``i`` of the blend; ``len()`` is the components' total per epoch."""

    final_order = True  # components are read front to back; samplers must not shuffle the blend

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: Sequence[int] = (0,),
                 block: int = 1024):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("one weight per dataset")
        w = np.asarray(weights, np.float64)
        if (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        if any(len(d) == 0 for d in datasets):
            raise ValueError("cannot blend a dataset without samples")
        self.datasets, self.weights, self.seed = list(datasets), w / w.sum(), tuple(seed)
        # >= 2 samples per dataset per block (1 would do, bar float rounding): counts stay monotone
        self.block = max(int(block), math.ceil(2.0 / self.weights.min()))
        self._blocks: "OrderedDict[int, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def counts_before(self, b: int) -> np.ndarray:
        """Samples each dataset has contributed before block ``b``."""
        target = self.weights * (b * self.block)
        base = np.floor(target).astype(np.int64)
        rest = b * self.block - int(base.sum())
        if rest > 0:
            base[np.argsort(-(target - base), kind="stable")[:rest]] += 1
        return base

    def _resolve(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """(dataset id, index within that dataset) for every position of block ``b``."""
        hit = self._blocks.get(b)
        if hit is None:
            before, after = self.counts_before(b), self.counts_before(b + 1)
            owner = np.repeat(np.arange(len(self.datasets)), after - before)
            owner = owner[seed_rng(*self.seed, b).permutation(len(owner))]
            index = np.empty(len(owner), np.int64)
            for d in range(len(self.datasets)):
                where = owner == d
                index[where] = before[d] + np.arange(int(where.sum()))
            hit = self._blocks[b] = (owner, index)
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return hit

    def locate(self, i: int) -> Tuple[int, int]:
        b, o = divmod(int(i), self.block)
        owner, index = self._resolve(b)
        return int(owner[o]), int(index[o])

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            raise IndexError(f"negative sample index {i}")
        d, k = self.locate(i)
        return self.datasets[d][k]

    def __iter__(self):
        return (self[i] for i in range(len(self)))
