"""What a run attaches to its steps: instruments (the profiler's timeline and meters), progress
(metrics, skip and non-finite checks) and, in tests, injected faults.

One step (``train_step``) and one checkpoint save serve training, fine-tuning and the profiler
alike; what differs between them is which hooks they pass. Faults come only from hooks a test
installs (``install``), never from switches read in the run's own code.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import ContextManager, Iterator, List, Sequence

import torch


class Hooks:
    """Every method is a no-op here; a hook overrides the ones it needs."""

    def step_begin(self, rt) -> None:
        """Before a step's first micro-batch (``rt.step`` is the step about to run)."""

    def phase(self, name: str) -> ContextManager:
        """Around ``step``, and each micro-batch's ``forward``, ``backward`` and ``optimizer``."""
        return nullcontext()

    def pipeline(self, engine) -> ContextManager:
        """Around DeepSpeed's pipeline schedule (pipeline-parallel steps, which have no micro-batch phases)."""
        return nullcontext()

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss before its backward pass."""
        return loss

    def step_end(self, rt, loss: torch.Tensor) -> None:
        """After the optimizer step; ``loss``: this rank's, whose DP mean is the step's loss."""

    def before_commit(self, step: int) -> None:
        """A checkpoint's files are written; its manifest and the ``latest`` pointer are not yet."""


class HookList(Hooks):
    """Several hooks as one, called in order (contexts nest: the first is outermost)."""

    def __init__(self, hooks: Sequence[Hooks] = ()):
        self.hooks = list(hooks)

    def step_begin(self, rt) -> None:
        for h in self.hooks:
            h.step_begin(rt)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with ExitStack() as stack:
            for h in self.hooks:
                stack.enter_context(h.phase(name))
            yield

    @contextmanager
    def pipeline(self, engine) -> Iterator[None]:
        with ExitStack() as stack:
            for h in self.hooks:
                stack.enter_context(h.pipeline(engine))
            yield

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        for h in self.hooks:
            loss = h.loss(step, loss)
        return loss

    def step_end(self, rt, loss: torch.Tensor) -> None:
        for h in self.hooks:
            h.step_end(rt, loss)

    def before_commit(self, step: int) -> None:
        for h in self.hooks:
            h.before_commit(step)


NO_HOOKS = Hooks()
_installed: List[Hooks] = []


def install(hook: Hooks) -> None:
    """Attach ``hook`` to every training run this process starts (tests inject faults this way)."""
    _installed.append(hook)


def installed() -> List[Hooks]:
    return list(_installed)
