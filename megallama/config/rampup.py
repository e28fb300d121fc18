"""Batch-size ramp-up as Megatron's ``--rampup-batch-size START INCREMENT SAMPLES`` defines it, and
the one rule that turns a run length in samples into optimizer steps.

The global batch starts at ``start`` and grows by ``increment`` after each ``samples / n``
consumed samples (``n`` increments in all) until it reaches the full global batch. It is keyed
to consumed samples, not steps, so a resume (which restores consumed samples) lands on the same
batch size mid-ramp. Pure: no torch, so ``validate`` and ``plan`` can call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BatchRamp:
    start: int
    increment: int
    samples: int
    full: int  # the global batch size after the ramp

    @property
    def increments(self) -> int:
        return (self.full - self.start) // self.increment

    def global_batch(self, consumed: int) -> int:
        """The global batch of the step that begins after ``consumed`` samples."""
        if self.increments == 0 or consumed >= self.samples:
            return self.full
        return min(self.full, self.start + consumed * self.increments // self.samples * self.increment)


def ramp_problem(ramp: Optional[List[int]], full: Optional[int]) -> Optional[str]:
    """One line when ``train.rampup_batch_size`` cannot ramp to ``full`` (None: it can)."""
    if ramp is None:
        return None
    if len(ramp) != 3 or any(v < 1 for v in ramp):
        return f"train.rampup_batch_size: expected three positive integers [start, increment, samples], got {ramp}"
    if full is None:
        return "train.rampup_batch_size: needs train.global_batch_size (the batch size the ramp ends at)"
    start, increment, _ = ramp
    if start >= full:
        return f"train.rampup_batch_size: start {start} must be below train.global_batch_size={full}"
    if (full - start) % increment:
        return (f"train.rampup_batch_size: train.global_batch_size - start = {full - start} is not a multiple "
                f"of the increment {increment}")
    return None


def samples_to_steps(samples: int, full: int, ramp: Optional[BatchRamp] = None) -> int:
    """The fewest optimizer steps whose global batches add up to at least ``samples`` (the last
    batch may overrun by less than one batch). Walks the ramp one increment at a time."""
    steps, consumed = 0, 0
    while consumed < samples:
        size = ramp.global_batch(consumed) if ramp else full
        if size == full:
            return steps + ceil_div(samples - consumed, full)
        k = consumed * ramp.increments // ramp.samples
        next_size_at = ceil_div((k + 1) * ramp.samples, ramp.increments)  # first count that moves to k + 1
        n = ceil_div(min(next_size_at, samples) - consumed, size)
        steps, consumed = steps + n, consumed + n * size
    return steps
