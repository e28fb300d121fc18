"""One start-up for every command (train, finetune, profile, eval, generate): the launcher, the
process group under the run's ``train.dist_timeout_s``, the parallel groups and the device; for
the commands that train, the DeepSpeed dict, their data and the engine.

Every check that needs no process group runs before one exists, so a bad config or a model too
big for this machine ends in one line without a rank waiting on another.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import torch

from megallama.config import ModelConfig, RunConfig
from megallama.errors import UserError
from megallama.parallel import ParallelState, initialize
from megallama.train.distributed import LaunchInfo, detect_launcher, device_for, init_distributed, on_rank0_then_share
from megallama.train.hooks import NO_HOOKS, Hooks
from megallama.train.step import LossFn, make_loss_fn, train_step

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a command's start-up made, handed to everything that runs after it (nothing here is
    looked up globally: the step, the loop and the profiler read it from this object)."""

    cfg: RunConfig
    info: LaunchInfo
    state: ParallelState
    device: torch.device
    ds: Optional[Dict[str, Any]] = None  # the DeepSpeed dict: commands that train
    loss_fn: Optional[LossFn] = None  # micro-batch -> loss: commands that train
    built: Any = None  # train.engine.Built, once ``build`` ran
    batches: Optional[Iterator] = None  # this rank's micro-batches on the device, when the command keeps them here
    step: int = 0  # the last optimizer step taken (a resumed run starts at its checkpoint's)
    consumed_samples: int = 0  # samples of the steps taken, every rank alike (the loop advances it)
    global_now: Optional[int] = None  # this step's global batch while train.rampup_batch_size ramps it
    mem_predicted: Optional[float] = None  # the fit check's peak bytes per rank (train and profile)
    micro_batch_choice: Optional[str] = None  # train.micro_batch_size: auto -- what it chose and why

    @property
    def rank0(self) -> bool:
        return self.info.rank == 0

    @property
    def engine(self):
        return self.built.engine

    @property
    def module(self) -> torch.nn.Module:
        return self.built.module

    @property
    def pipeline(self) -> bool:
        return self.built.pipeline

    @property
    def batch(self):
        """micro x accumulation x DP = global, as this layout resolves ``train``'s sizes."""
        return self.cfg.train.batch_layout(self.state.dp)

    @property
    def global_batch(self) -> int:
        """This step's global batch: ``train``'s, or the ramp's while it ramps."""
        return self.global_now or self.batch.global_

    @property
    def accum(self) -> int:
        b = self.batch
        return b.accum if self.global_now is None else self.global_now // (b.micro * b.dp)

    def ramp_batch(self, sampler=None) -> int:
        """Before each step under ``train.rampup_batch_size``: the global batch for the samples
        consumed so far, set in DeepSpeed's engine (its gradient accumulation steps; the pipeline
        engine's micro-batch count), in the sampler and here. Keyed to consumed samples, so a
        resume mid-ramp takes the same sizes."""
        ramp = self.cfg.train.ramp
        if ramp is None:
            return self.global_batch
        size = ramp.global_batch(self.consumed_samples)
        if size != self.global_now:
            self.engine.set_train_batch_size(size)
            self.global_now = size
            opt = self.engine.optimizer  # ZeRO reads its own copy (CPU offload's gradient buffers)
            if isinstance(getattr(opt, "gradient_accumulation_steps", None), int):
                opt.gradient_accumulation_steps = self.accum
            if sampler is not None:
                sampler.accum = self.accum
        return size

    def scheduled_step(self, batches: Iterator, hooks: Hooks = NO_HOOKS, sampler=None) -> torch.Tensor:
        """One step of a command that trains through its schedule (``train``, ``finetune``): at the
        ramp's global batch for the samples consumed so far (:meth:`ramp_batch`), then counted in
        ``consumed_samples``. The profiler calls ``train_step`` bare: it measures the full batch."""
        self.ramp_batch(sampler)
        loss = train_step(self, batches, hooks)
        self.consumed_samples += self.global_batch
        return loss

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_ * self.cfg.train.seq_len

    def build(self, universal=None, step: int = 0, module: Optional[torch.nn.Module] = None,
              weights_only: bool = False):
        """The engine over this rank's shard (``module``: a model the command built itself)."""
        from megallama.train.engine import build_engine

        self.built = build_engine(self.cfg, self.state, self.ds, self.device, universal=universal, step=step,
                                  module=module, weights_only=weights_only)
        self.step = step
        return self.built

    def sampler(self, dataset, consumed_samples: int = 0):
        """This rank's DP share of ``dataset``, ``micro`` rows at a time, from ``consumed_samples`` on."""
        from megallama.data import MicroBatchIterator

        b = self.batch
        return MicroBatchIterator(dataset, b.micro, b.accum, self.state.dp_rank, self.state.dp,
                                  consumed_samples=consumed_samples, seed=self.cfg.train.seed)


def start(cfg: RunConfig, info: Optional[LaunchInfo] = None, training: bool = True, fits: bool = False) -> Runtime:
    """Launcher, checks, process group, parallel groups, device. ``training``: the command builds
    an engine (its DeepSpeed dict is made and checked first); ``fits``: refuse a model or batch
    this machine cannot hold, before anything is allocated."""
    info = info or detect_launcher()
    cfg.check_layout(info.world_size)  # every layout error surfaces before any process group exists
    from megallama.train.prediction import choose_micro_batch

    cfg, choice = choose_micro_batch(cfg, info.world_size)   # train.micro_batch_size: auto
    ds, mem_predicted = None, None
    if training:
        from megallama.train.ds_config import build_ds_config, check_device_supports

        ds = build_ds_config(cfg, info.world_size)
        check_device_supports(ds)
    if fits:
        from megallama.train.fits import check_training_fits

        mem_predicted = check_training_fits(cfg, info.world_size, info.local_rank)
    init_distributed(cfg.train.dist_timeout_s, info)  # joins an initialised group as it is
    if training and not torch.cuda.is_available():  # the engine loads DeepSpeed's comm op: never on a stale lock
        from megallama.train.warmup_ops import check_comm_op_lock

        check_comm_op_lock()
    p = cfg.parallel
    state = initialize(p.tp, p.pp, p.sequence_parallel, ulysses=p.ulysses)
    loss_fn = (make_loss_fn(cfg.model.arch, cfg.train.seq_len, cfg.data.document_mask, cfg.data.reset_position_ids)
               if training else None)
    return Runtime(cfg, info, state, device_for(info.local_rank), ds, loss_fn, mem_predicted=mem_predicted,
                   micro_batch_choice=choice)


def inference_config(model: ModelConfig, tp: int, dist_timeout_s: Optional[int] = None) -> RunConfig:
    """The run config an inference command starts under: a checkpoint's model over ``tp`` ranks."""
    train = {"seq_len": min(8, model.max_seq_len)}
    if dist_timeout_s is not None:
        train["dist_timeout_s"] = dist_timeout_s
    return RunConfig(model=model, parallel={"tp": tp}, train=train)


def prepared_data(cfg: RunConfig):
    """The run's :class:`~megallama.data.prepare.DataArtifacts` (token files, weights, the tokenizer
    they were made with): rank 0 builds or finds them, every rank gets the answer."""
    from megallama.data import prepare_data

    return on_rank0_then_share(lambda: prepare_data(cfg))


def open_datasets(cfg: RunConfig, data=None):
    """``(train, valid, test)`` over ``data`` (default: :func:`prepared_data`)."""
    from megallama.data import build_datasets

    return build_datasets(cfg, data if data is not None else prepared_data(cfg))


def on_device(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    for rows in batches:
        yield rows.to(device, non_blocking=True)


@contextmanager
def guard(rt: Runtime, checkpoints: bool = False, heartbeats: bool = False) -> Iterator[None]:
    """The run directory held by this job alone (and, with ``checkpoints``, the checkpoint
    directory checked) and, with ``heartbeats`` over several ranks, the watchdog: a collective
    that fails because a peer died ends in one line naming that peer."""
    from megallama.train.run_lock import hold_run_dir
    from megallama.train.watchdog import Watchdog

    cfg, info = rt.cfg, rt.info
    lock = hold_run_dir(cfg.run_dir, cfg.checkpoint.dir if checkpoints else None,
                        checkpoints and cfg.checkpoint.every > 0)
    watchdog = None
    if heartbeats and info.world_size > 1 and cfg.train.heartbeat_timeout_s > 0:
        watchdog = Watchdog(info.rank, info.world_size, cfg.train.heartbeat_timeout_s).start()
    finished = False
    try:
        yield
        finished = True
    except (RuntimeError, OSError) as exc:
        problem = watchdog.wait_for_dead_rank() if watchdog else None
        if problem:
            raise UserError(peer_failure(problem, info.rank, exc)) from None
        raise
    finally:
        if watchdog:
            watchdog.stop(finished)
        if lock:
            lock.release()


def peer_failure(problem: str, rank: int, exc: BaseException) -> str:
    """One whole line: the failed peer, and this rank stopping because of it, with the collective's
    own reason only when it is short enough to quote whole (never cut mid-sentence)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[file.cc:123] " prefix
    cause = f"{type(exc).__name__}: {first}" if first and len(first) <= 160 else type(exc).__name__
    return f"{problem}; rank {rank} stops because a collective with it failed ({cause})"

