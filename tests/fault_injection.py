"""``python -m tests.fault_injection [FAULTS] COMMAND ...``: megallama's CLI with faults installed
as run hooks (``megallama.train.hooks.install``), so the run's own code reads no fault switches.

FAULTS: ``--nonfinite-steps 2,3`` makes those steps' losses infinite (the skip and stop logic);
``--slow-save-s 30`` holds every checkpoint save open after its files are written and before its
manifest and ``latest`` (a window to kill it in); ``--slow-steps-s 0.5`` makes every step that much
longer (a window to signal a run mid-way); ``--signal-at 4:1`` has rank 1 alone send itself SIGTERM
as step 4 begins (a signal that reached only some ranks); ``--untie-pipeline-grads 1`` stops
DeepSpeed all-reducing tied weights' gradients between pipeline stages (a broken tie).
"""
from __future__ import annotations

import os
import signal
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


class SlowSteps(Hooks):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def step_end(self, rt, loss: torch.Tensor) -> None:
        time.sleep(self.seconds)


class SignalAt(Hooks):
    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def step_begin(self, rt) -> None:
        if rt.step == self.step and rt.info.rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class UntiePipelineGrads(Hooks):
    def __init__(self):
        from deepspeed.runtime.pipe.module import PipelineModule

        PipelineModule.get_tied_weights_and_groups = lambda module: []


FAULTS = {"--nonfinite-steps": lambda v: NonFiniteLoss(int(x) for x in v.split(",") if x.strip()),
          "--slow-save-s": lambda v: SlowSave(float(v)), "--slow-steps-s": lambda v: SlowSteps(float(v)),
          "--signal-at": lambda v: SignalAt(*(int(x) for x in v.split(":"))),
          "--untie-pipeline-grads": lambda v: UntiePipelineGrads()}


def install_faults(argv: List[str]) -> List[str]:
    """Install the faults named at the front of ``argv``; returns the rest (the megallama command)."""
    argv = list(argv)
    while argv and argv[0] in FAULTS:
        flag, value = argv.pop(0), argv.pop(0)
        install(FAULTS[flag](value))
    return argv


def main(argv: Optional[List[str]] = None) -> int:
    from megallama.cli import main as megallama

    return megallama(install_faults(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
