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
from megallama.train.ds_settings import DeepSpeedSettings, EngineTraits
from megallama.train.optim import build_optimizer, build_scheduler
from megallama.train.pipeline import build_pipeline_module
from megallama.train.recompute import apply_activation_checkpointing, checkpoint_function

log = logging.getLogger(__name__)


@dataclass
class Built:
    engine: Any
    module: torch.nn.Module
    pipeline: bool
    traits: EngineTraits  # DeepSpeed's optimizer here and the patches applied to the engine


def _build_module(cfg: RunConfig, state: ParallelState, ds: Dict[str, Any], device: torch.device):
    import deepspeed

    seed = cfg.train.seed
    if state.pp > 1:
        return build_pipeline_module(cfg.model, state, seed, cfg.stage_layers()).to(device)
    if DeepSpeedSettings.of(ds).zero_stage == 3:
        # partition over data x Ulysses ranks only (they hold the same weights): each TP rank's shard
        # is its own tensor
        with deepspeed.zero.Init(data_parallel_group=state.seq_dp_group, mpu=state, config_dict_or_path=ds):
            module = build_model(cfg.model, state, seed=None)
        for part, key in module.init_parts():
            params = list(part.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                init_module(part, seed, key)  # identical on every rank; rank 0's copy is kept
    else:
        module = build_model(cfg.model, state, seed=seed).to(device)
    return module


def build_engine(cfg: RunConfig, state: ParallelState, ds: Dict[str, Any], device: torch.device,
                 universal=None, step: int = 0, module: torch.nn.Module = None, weights_only: bool = False) -> Built:
    """``universal``: a :class:`UniversalReader` to start from (a checkpoint of another layout;
    ``weights_only``: its weights alone, with a fresh optimizer); ``module``: a model built by the
    caller (e.g. a classifier for fine-tuning) instead of the LM."""
    import deepspeed

    from megallama.train import deepspeed_patches as patches
    from megallama.train import universal as uni

    if device.type == "cpu":  # deepspeed.initialize may JIT-load the comm op: never hang on a stale lock
        from megallama.train.warmup_ops import check_comm_op_lock

        check_comm_op_lock()
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():  # one process starts on a plain torch group: DeepSpeed's layer joins it here
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        if device.type == "cpu":
            from megallama.train.comm_buffers import release_after_start

            release_after_start()
    ckpt_fn = checkpoint_function(cfg, state)
    model_parallel_seed(state, cfg.train.seed)
    if module is None:
        module = _build_module(cfg, state, ds, device)
    else:
        module = module.to(device)
    pipeline, ac = state.pp > 1, cfg.train.activation_checkpointing
    apply_activation_checkpointing(module, ac.mode, ac.every, ckpt_fn)
    if universal is not None:
        uni.load_weights_into_module(universal, module, state)
    compile_blocks(module, cfg.train.compile)  # in place: names and state dict unchanged
    optimizer = build_optimizer(module, cfg.train)
    # a callable: DeepSpeed builds the schedule on the optimizer it wraps ours in
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           lr_scheduler=lambda opt: build_scheduler(opt, cfg.train), config=ds,
                                           mpu=None if state.pp > 1 else state, dist_init_required=False)
    settings = DeepSpeedSettings.of(ds)
    traits = EngineTraits(settings.zero_stage, settings.precision, patches.optimizer_kind(engine.optimizer),
                          state.dp * state.ulysses, pipeline, state.ulysses)
    _apply_patches(engine, traits)
    _warn_zero_without_dp(state, settings)
    if universal is not None:
        uni.load_optimizer_state(universal, engine, module, state, step, moments=not weights_only)
        set_schedule_position(engine.lr_scheduler, step)
    return Built(engine=engine, module=module, pipeline=pipeline, traits=traits)


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


def _apply_patches(engine, traits: EngineTraits) -> None:
    """Exactly the patches ``traits`` names (``megallama.train.deepspeed_patches``)."""
    from megallama.train import deepspeed_patches as patches

    if traits.resets_unfused_warmup:
        patches.undo_unfused_warmup_step(engine)
    if traits.norms_in_fp64:
        patches.fp64_cpu_norms()
    if traits.clips_fp32:
        patches.record_fp32_grad_norm(engine)
    if traits.skips_dp_allreduce:
        patches.skip_self_allreduce(engine)
    if traits.sums_zero3_sequence_grads:
        patches.sum_zero3_sequence_grads(engine)


def _warn_zero_without_dp(state: ParallelState, settings: DeepSpeedSettings) -> None:
    """ZeRO with one data-parallel rank and no offload is a configuration slip worth a line."""
    import torch.distributed as dist

    if state.dp * state.ulysses == 1 and settings.zero_stage > 0 and not settings.offloaded and \
            (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("ZeRO stage %d with one data-parallel rank partitions nothing but still copies every gradient "
                    "and parameter through its flat buffers (~16%% of a bf16 CPU step in benchmarks/peer_step.py); "
                    "stage 0 is faster here", settings.zero_stage)


