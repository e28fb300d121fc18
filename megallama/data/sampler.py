"""Micro-batches for one data-parallel rank, positioned by one number: consumed samples.

The global sample stream is fixed by the dataset alone: our packed and blended datasets are
already in their seeded training order (``final_order``), so position ``p`` is ``dataset[p]``
and reading goes front to back. Any other dataset (a list, a torch Dataset) is shuffled here:
position ``p`` is sample ``perm_e[p mod N]`` of epoch ``e = p // N``, a permutation seeded by
``seed`` (None: in order). Global batch ``k`` of size G = micro x accum x dp is positions
``[kG, (k+1)G)``; micro-step ``m`` of it is ``[kG + m*micro*dp, kG + (m+1)*micro*dp)`` and rank
``r`` takes its ``r``-th ``micro`` samples (Megatron's order). Nothing depends on dp beyond that
slicing, so a run resumed from ``consumed_samples`` at any dp sees the same global batches as
one that never stopped.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from megallama.data.packing import seed_rng
from megallama.errors import UserError


class MicroBatchIterator:
    """``next(it)`` -> LongTensor [micro_batch_size, seq_len + 1] for this rank."""

    def __init__(self, dataset, micro_batch_size: int, grad_accum_steps: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, seed: Optional[int] = None):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps),
                            ("dp_size", dp_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if len(dataset) == 0:
            raise UserError(f"{getattr(dataset, 'name', 'dataset')}: no samples to train on "
                            "(fewer tokens than seq_len + 1; add data or shorten train.seq_len)")
        self.dataset, self.seed = dataset, seed
        self.micro, self.accum, self.dp_rank, self.dp_size = micro_batch_size, grad_accum_steps, dp_rank, dp_size
        self.consumed_samples = int(consumed_samples)
        self.micro_step = 0  # micro-batches taken from the current global batch
        self._perm: Tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def global_batch_size(self) -> int:
        return self.micro * self.accum * self.dp_size

    def dataset_index(self, position: int) -> int:
        """Dataset index of global stream position ``position``."""
        if getattr(self.dataset, "final_order", False):
            return int(position)  # ours: indices past len() are later epochs, in their own order
        n = len(self.dataset)
        epoch, i = divmod(int(position), n)
        if self.seed is None:
            return i
        if self._perm[0] != epoch:
            self._perm = (epoch, seed_rng(self.seed, 0x5A3E, epoch).permutation(n))
        return int(self._perm[1][i])

    def positions(self) -> range:
        """Stream positions of this rank's next micro-batch."""
        start = (self.consumed_samples + self.micro_step * self.micro * self.dp_size
                 + self.dp_rank * self.micro)
        return range(start, start + self.micro)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self):
        import torch

        batch = np.stack([self.dataset[self.dataset_index(p)] for p in self.positions()])
        self.micro_step += 1
        if self.micro_step == self.accum:
            self.micro_step = 0
            self.consumed_samples += self.global_batch_size
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}
