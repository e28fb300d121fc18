"""What each training step reports (a hook on ``train_step``): the loss every rank agrees on,
skipped optimizer steps, a run of non-finite losses that stops the run, and one metrics line
per ``train.log_every`` and evaluating step (loss, LR, grad norm, loss scale, batch size,
throughput, memory, ETA)."""
from __future__ import annotations

import logging
import math
import time
from typing import List, Optional

import torch

from megallama.errors import UserError
from megallama.train.hooks import Hooks
from megallama.train.metrics import MetricsLogger
from megallama.train.step import step_loss

log = logging.getLogger(__name__)


def loss_scale(engine) -> Optional[float]:
    opt = getattr(engine, "optimizer", None)
    scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def skipped_steps(engine) -> int:
    return int(getattr(engine, "skipped_steps", 0))


class Progress(Hooks):
    def __init__(self, metrics: MetricsLogger, start_step: int, last_step: int, max_bad_steps: int, log_every: int,
                 eval_every: int = 0):
        self.metrics, self.start_step, self.last_step = metrics, start_step, last_step
        self.max_bad_steps, self.log_every, self.eval_every = max_bad_steps, log_every, eval_every
        self.losses: List[float] = []
        self.bad_in_a_row, self.skips_seen, self.lr = 0, 0, 0.0
        self.restart_window(start_step)

    def restart_window(self, step: int) -> None:
        """Throughput is measured from here (evaluation and checkpoint time stay out of it)."""
        self.last_log, self.last_logged, self.window_tokens = time.perf_counter(), step, 0

    def logs_at(self, step: int) -> bool:
        """Steps with a record: every ``log_every``-th, the first and last of the run, and every
        evaluating step (its record carries the evaluation too)."""
        return step % self.log_every == 0 or step in (self.last_step, self.start_step + 1) or \
            self.eval_every > 0 and step % self.eval_every == 0

    def step_begin(self, rt) -> None:
        self.lr = rt.engine.get_lr()[0]  # the LR this step applies (the schedule moves on inside engine.step)
        self.global_batch = rt.global_batch  # this step's (train.rampup_batch_size may grow it)
        self.window_tokens += self.global_batch * rt.cfg.train.seq_len

    def step_end(self, rt, loss: torch.Tensor) -> None:
        step, engine = rt.step, rt.engine
        value = step_loss(rt, loss)
        skips = skipped_steps(engine)
        if skips > self.skips_seen and rt.rank0:
            scale = loss_scale(engine)
            log.warning("step %d: optimizer step skipped: non-finite gradients%s (%d skipped so far)", step,
                        f" (loss scaler overflow; scale now {scale})" if scale else "", skips)
        self.skips_seen = skips
        self.losses.append(value)
        self._check_finite(value, step)
        if self.logs_at(step):
            gn = engine.get_global_grad_norm()
            elapsed = time.perf_counter() - self.last_log
            window = elapsed / max(1, step - self.last_logged)
            tps = self.window_tokens / elapsed if elapsed > 0 else 0.0
            self.restart_window(step)
            self.metrics.log(step, value, self.lr, float(gn) if gn is not None else None, window, tps,
                             step - self.start_step,
                             extra={"skipped_steps": skipped_steps(engine), "loss_scale": loss_scale(engine),
                                    "global_batch_size": self.global_batch,
                                    "tokens": (rt.consumed_samples + self.global_batch) * rt.cfg.train.seq_len})

    def _check_finite(self, value: float, step: int) -> None:
        if math.isfinite(value):
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise UserError(f"train: loss was non-finite for {self.bad_in_a_row} steps in a row (train.max_bad_steps="
                            f"{self.max_bad_steps}); stopping at step {step}")
