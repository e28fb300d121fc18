"""The only place that calls ``deepspeed.initialize``: model, optimizer, schedule, engine.

ZeRO-3 builds the model inside ``deepspeed.zero.Init`` (each parameter partitioned as soon as
its module exists) and initialises one part at a time under ``GatheredParameters``; other
stages build layer by layer, each rank keeping only its TP slice, so no rank ever holds the
whole model. Pipeline runs build only this stage's layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from megallama.config import RunConfig
from megallama.model import build_model
from megallama.model.compile import compile_blocks
from megallama.model.blocks import init_module
from megallama.parallel import ParallelState, model_parallel_seed
from megallama.train.ds_config import zero_stage
from megallama.train.optim import build_optimizer, build_scheduler
from megallama.train.pipeline import build_pipeline_module
from megallama.train.recompute import apply_activation_checkpointing, checkpoint_function

log = logging.getLogger(__name__)


@dataclass
class Built:
    engine: Any
    module: torch.nn.Module
    pipeline: bool


def _build_module(cfg: RunConfig, state: ParallelState, ds: Dict[str, Any], device: torch.device):
    import deepspeed

    seed = cfg.train.seed
    if state.pp > 1:
        return build_pipeline_module(cfg.model, state, seed, cfg.parallel.pipeline_partition).to(device)
    if zero_stage(ds) == 3:
        # partition over the data-parallel group only: each TP rank's shard is its own tensor
        with deepspeed.zero.Init(data_parallel_group=state.dp_group, mpu=state, config_dict_or_path=ds):
            module = build_model(cfg.model, seed=None)
        for part, key in module.init_parts():
            params = list(part.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                init_module(part, seed, key)  # identical on every rank; rank 0's copy is kept
    else:
        module = build_model(cfg.model, seed=seed).to(device)
    return module


def build_engine(cfg: RunConfig, state: ParallelState, ds: Dict[str, Any], device: torch.device,
                 universal=None, step: int = 0, module: torch.nn.Module = None) -> Built:
    """``universal``: a :class:`UniversalReader` to start from (a checkpoint of another layout);
    ``module``: a model built by the caller (e.g. a classifier for fine-tuning) instead of the LM."""
    import deepspeed

    from megallama.train import universal as uni

    if device.type == "cpu":  # deepspeed.initialize may JIT-load the comm op: never hang on a stale lock
        from megallama.train.warmup_ops import check_comm_op_lock

        check_comm_op_lock()
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():  # one process starts on a plain torch group: DeepSpeed's layer joins it here
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    ckpt_fn = checkpoint_function(cfg, state)
    model_parallel_seed(cfg.train.seed)
    if module is None:
        module = _build_module(cfg, state, ds, device)
    else:
        module = module.to(device)
    ac = cfg.train.activation_checkpointing
    apply_activation_checkpointing(module, ac.mode, ac.every, ckpt_fn)
    if universal is not None:
        uni.load_weights_into_module(universal, module, state)
    compile_blocks(module, cfg.train.compile)  # in place: names and state dict unchanged
    optimizer = build_optimizer(module, cfg.train)
    # a callable: DeepSpeed builds the schedule on the optimizer it wraps ours in
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           lr_scheduler=lambda opt: build_scheduler(opt, cfg.train), config=ds,
                                           mpu=None if state.pp > 1 else state, dist_init_required=False)
    _undo_unfused_warmup_step(engine)
    _record_fp32_grad_norm(engine)
    _skip_self_allreduce(engine, state, ds)
    _warn_zero_without_dp(state, ds)
    if universal is not None:
        uni.load_optimizer_state(universal, engine, module, state, step)
        set_schedule_position(engine.lr_scheduler, step)
    return Built(engine=engine, module=module, pipeline=state.pp > 1)


def _undo_unfused_warmup_step(engine) -> None:
    """DeepSpeed's FP16_UnfusedOptimizer (bf16 or fp16 at ZeRO-0 without a pipeline) builds Adam's
    state by stepping once on zero gradients: the step count starts at 1 (every bias correction
    off by a step) and the fp32 master weights shrink once by weight decay. Seen: step-2 grad
    norm 3.468 against 3.655 for every other bf16 path (fp32: 3.677). Start both afresh; the
    masters were cloned from the model's weights, which that step did not touch."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return
    opt.optimizer.state.clear()
    with torch.no_grad():
        for low, master in zip(opt.fp16_groups, opt.fp32_groups):
            for p_low, p_master in zip(low, master):
                p_master.copy_(p_low)


def set_schedule_position(sched, step: int, base_lr: Optional[float] = None) -> None:
    """Put the LR schedule where it stands after ``step`` optimizer steps (the LR of the step about
    to run), optionally from a new peak ``base_lr``. Set directly: calling ``step()`` before the
    optimizer has stepped is what torch warns about on every resume."""
    if base_lr is not None:
        sched.base_lrs = [base_lr] * len(sched.base_lrs)
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def _skip_self_allreduce(engine, state: ParallelState, ds: Dict[str, Any]) -> None:
    """With one data-parallel rank DeepSpeed's ZeRO-0 path still flattens every gradient into
    buckets, all-reduces them with itself and copies them back (~4% of a CPU step); skip it.
    ZeRO-1+ and the bf16 optimizer move gradients into their own buffers on that path: kept."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if state.dp == 1 and state.pp == 1 and zero_stage(ds) == 0 and not isinstance(engine.optimizer, BF16_Optimizer):
        engine.enable_backward_allreduce = False


def _warn_zero_without_dp(state: ParallelState, ds: Dict[str, Any]) -> None:
    """ZeRO with one data-parallel rank and no offload is a configuration slip worth a line."""
    import torch.distributed as dist

    zero = ds.get("zero_optimization") or {}
    offloaded = any(str((zero.get(k) or {}).get("device", "none")) != "none"
                    for k in ("offload_optimizer", "offload_param"))
    if state.dp == 1 and zero_stage(ds) > 0 and not offloaded and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("ZeRO stage %d with one data-parallel rank partitions nothing but still copies every gradient "
                    "and parameter through its flat buffers (~16%% of a bf16 CPU step in benchmarks/peer_step.py); "
                    "stage 0 is faster here", zero_stage(ds))


def _record_fp32_grad_norm(engine) -> None:
    """DeepSpeed's ZeRO-0 fp32 path clips but drops the norm it computed, and applies a step
    with NaN/inf gradients (its ZeRO and fp16 optimizers skip those). Keep the norm for the
    logs, and mark a non-finite one as an overflow: the engine then skips the update and the LR
    step and counts it in ``skipped_steps``, as it does for its own optimizers."""
    import functools
    import math

    from deepspeed.runtime.utils import clip_grad_norm_

    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "overflow"):
        return  # a DeepSpeed optimizer: it detects overflow itself

    mpu = _PipelineNormGroups(engine.mpu) if hasattr(engine.mpu, "get_slice_parallel_rank") else engine.mpu

    def clip_and_record():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=mpu)
        engine._global_grad_norm = norm
        opt.overflow = not math.isfinite(float(norm))

    real_step = opt.step  # the LR scheduler's call-counting wrapper of AdamW.step: kept inside ours

    @functools.wraps(real_step)  # carries its marker, so torch sees the step still counted (no warning)
    def guarded_step(*args, **kwargs):
        if getattr(opt, "overflow", False):
            return None
        return real_step(*args, **kwargs)

    opt.overflow = False
    opt.step = guarded_step
    engine.clip_fp32_gradients = clip_and_record


class _PipelineNormGroups:
    """DeepSpeed's ``clip_grad_norm_`` counts a parameter that TP replicates (the RMSNorm weights)
    only where ``get_model_parallel_rank() == 0``; the pipeline grid's model-parallel rank spans
    stages, so every stage but the first left its norm weights out of the norm (and the clip)."""

    def __init__(self, grid):
        self.grid = grid

    def get_model_parallel_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()  # the TP rank within this stage

    def get_model_parallel_group(self):
        return self.grid.get_model_parallel_group()  # the sum still spans every stage and TP rank
