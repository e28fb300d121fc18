"""``python -m tests.fault_injection [FAULTS] COMMAND ...``: megallama's CLI with faults installed
as run hooks (``megallama.train.hooks.install``), so the run's own code reads no fault switches.

FAULTS: ``--nonfinite-steps 2,3`` makes those steps' losses infinite (the skip and stop logic);
``--slow-save-s 30`` holds every checkpoint save open after its files are written and before its
manifest and ``latest`` (a window to kill it in).
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import torch

from megallama.train.hooks import Hooks, install


class NonFiniteLoss(Hooks):
    def __init__(self, steps):
        self.steps = set(steps)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("inf") if step in self.steps else loss


class SlowSave(Hooks):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def before_commit(self, step: int) -> None:
        time.sleep(self.seconds)


def install_faults(argv: List[str]) -> List[str]:
    """Install the faults named at the front of ``argv``; returns the rest (the megallama command)."""
    argv = list(argv)
    while argv and argv[0] in ("--nonfinite-steps", "--slow-save-s"):
        flag, value = argv.pop(0), argv.pop(0)
        if flag == "--nonfinite-steps":
            install(NonFiniteLoss(int(x) for x in value.split(",") if x.strip()))
        else:
            install(SlowSave(float(value)))
    return argv


def main(argv: Optional[List[str]] = None) -> int:
    from megallama.cli import main as megallama

    return megallama(install_faults(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
