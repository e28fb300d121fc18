"""Preemption: SIGTERM or SIGINT (SLURM's notice before a time limit, Ctrl-C, a launcher passing
either on) or ``train.time_limit_min`` ends a run at a step boundary, after a checkpoint, with
exit code ``PREEMPTED_EXIT`` (75); the same command then resumes with no step lost.

A signal may reach only some ranks, so the decision is collective: after every step the ranks
all_reduce (MAX) one small flag and all stop after the same step. The handler only records the
signal, so nothing is raised inside a step or a checkpoint save. A second signal while stopping is
reported and otherwise ignored: the save in progress completes. SIGKILL still ends a process at
once, and then (as after any crash) ``latest`` still names the previous complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from megallama.errors import PREEMPTED_EXIT

SIGNALS = (signal.SIGTERM, signal.SIGINT)
NONE, TIME_LIMIT, SIGNALLED = 0, 1, 2  # MAX over ranks: a signal anywhere outranks the clock


def _process_start() -> float:
    """Wall-clock time this process started (start-up counts against a scheduler's limit)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil or no /proc: from now on
        return time.time()


class Preemption:
    """Used as a context around the training steps: handlers installed on entry, restored on exit."""

    def __init__(self, time_limit_min: Optional[float], device: torch.device):
        self.limit_s = None if time_limit_min is None else time_limit_min * 60.0
        self.device = device
        self.started = _process_start()
        self.received: Optional[str] = None  # the first signal's name on this rank
        self.step_s = 0.0  # the slowest step so far
        self.save_s: Optional[float] = None  # the slowest checkpoint save so far
        self._previous = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
                signal.siginterrupt(sig, False)  # a system call under way resumes instead of failing
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            text = (f"megallama: {name} received: every rank stops after the current step, saves a checkpoint "
                    f"and exits {PREEMPTED_EXIT}\n")
        else:
            text = f"megallama: {name} again: already stopping; the checkpoint save finishes first (SIGKILL forces)\n"
        os.write(2, text.encode())  # not sys.stderr: the interrupted code may be inside its write

    def reserve_s(self) -> float:
        """Time kept for one more step and a save: the slowest of each measured so far; before the
        first save, 5% of the limit (at most 10 minutes) stands in for it."""
        save = self.save_s if self.save_s is not None else min(0.05 * (self.limit_s or 0.0), 600.0)
        return self.step_s + save

    def _local(self) -> int:
        if self.received:
            return SIGNALLED
        if self.limit_s is not None and time.time() - self.started + self.reserve_s() >= self.limit_s:
            return TIME_LIMIT
        return NONE

    def should_stop(self, step_s: float) -> Optional[str]:
        """Collective, after each step (``step_s``: its duration): why every rank stops now, or None."""
        self.step_s = max(self.step_s, step_s)
        code = self._local()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code == SIGNALLED:
            return f"preempted by {self.received}" if self.received else "preempted by a signal to another rank"
        if code == TIME_LIMIT:
            return f"train.time_limit_min={self.limit_s / 60:g} nearly reached"
        return None

    def saved(self, save_s: float) -> None:
        self.save_s = max(self.save_s or 0.0, save_s)
