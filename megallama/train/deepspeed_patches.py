"""Every place megallama reaches into DeepSpeed's private engine and optimizer internals.

Each patch below was written against DeepSpeed 0.19.x and names the private attribute it relies
on; importing this module refuses any other version in one line, so a DeepSpeed upgrade fails
here, at start-up, rather than as a silently wrong step. ``tests/test_deepspeed_patches.py``
shows each patch taking effect. Which patches an engine gets is decided by its
:class:`~megallama.train.ds_settings.EngineTraits`, the rule the cost models read too.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable, Iterator, List, Tuple

import torch
import torch.distributed as dist

SUPPORTED = "0.19"   # major.minor the patches were written against


@contextlib.contextmanager
def quiet_cpu_fallback_notice():
    """Importing DeepSpeed announces its CPU fallback on stdout; keep it out of our output
    (``megallama validate --json`` prints JSON only)."""
    logger = logging.getLogger("DeepSpeed")

    def drop(record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def check_version(version: str) -> None:
    """Refuse a DeepSpeed whose internals the patches were not written against."""
    if ".".join(version.split(".")[:2]) != SUPPORTED:
        raise ImportError(f"megallama needs DeepSpeed {SUPPORTED}.x (its engine patches are written against it), "
                          f"found {version}")


with quiet_cpu_fallback_notice():
    import deepspeed

check_version(deepspeed.__version__)

# ------------------------------------------------------------------ the keys DeepSpeed 0.19 reads
# top-level keys (DeepSpeed ignores unknown ones without a word: build_ds_config refuses them)
TOP_LEVEL_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown",
    "activation_checkpointing", "pipeline", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "tensorboard", "flops_profiler", "comms_logger", "checkpoint", "data_types", "seq_parallel_communication_data_type",
    "dump_state", "memory_breakdown", "amp", "sparse_gradients", "wandb", "csv_monitor", "elasticity",
    "aio", "compression_training", "autotuning", "data_efficiency", "timers", "torch_autocast",
}
# sections read as mappings, and the types of the scalar keys (batch sizes and clipping are compared
# with the run config by build_ds_config)
MAPPING_KEYS = {
    "zero_optimization", "bf16", "fp16", "activation_checkpointing", "pipeline", "tensorboard", "flops_profiler",
    "comms_logger", "checkpoint", "data_types", "wandb", "csv_monitor", "elasticity", "aio", "compression_training",
    "autotuning", "data_efficiency", "timers", "torch_autocast", "amp",
}
BOOL_KEYS = {"wall_clock_breakdown", "prescale_gradients", "zero_allow_untested_optimizer",
             "zero_force_ds_cpu_optimizer", "dump_state", "memory_breakdown", "sparse_gradients"}
POSITIVE_INT_KEYS = {"steps_per_print"}
NUMBER_KEYS = {"gradient_predivide_factor"}
PIPELINE_KEYS = {"stages", "partition", "seed_layers", "activation_checkpoint_interval", "pipe_partitioned",
                 "grad_partitioned", "use_reentrant"}


# ----------------------------------------------------------------------------- the optimizer
def optimizer_kind(opt) -> str:
    """Which optimizer DeepSpeed built around ours, named as ``EngineTraits.optimizer`` names it."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    for cls, kind in ((BF16_Optimizer, "bf16"), (FP16_UnfusedOptimizer, "unfused"),
                      ((DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3), "zero")):
        if isinstance(opt, cls):
            return kind
    return "torch" if isinstance(opt, torch.optim.Optimizer) else type(opt).__name__


def undo_unfused_warmup_step(engine) -> None:
    """DeepSpeed's FP16_UnfusedOptimizer (bf16 or fp16 at ZeRO-0 without a pipeline) builds Adam's
    state by stepping once on zero gradients: the step count starts at 1 (every bias correction
    off by a step) and the fp32 master weights shrink once by weight decay, so its step-2 grad
    norm differed from every other bf16 path. Start both afresh (``fp16_groups``/``fp32_groups``);
    the masters were cloned from the model's weights, which that step did not touch."""
    opt = engine.optimizer
    opt.optimizer.state.clear()
    with torch.no_grad():
        for low, master in zip(opt.fp16_groups, opt.fp32_groups):
            for p_low, p_master in zip(low, master):
                p_master.copy_(p_low)


def skip_self_allreduce(engine) -> None:
    """With one data-parallel rank DeepSpeed's ZeRO-0 path still flattens every gradient into
    buckets, all-reduces them with itself and copies them back; ``enable_backward_allreduce``
    off skips it (ZeRO-1+ and the bf16 optimizer move gradients into their own buffers there, so
    ``EngineTraits.skips_dp_allreduce`` leaves them alone)."""
    engine.enable_backward_allreduce = False


def sum_zero3_sequence_grads(engine) -> None:
    """DeepSpeed sums gradients over sequence-parallel (Ulysses) ranks and averages them over data
    ranks; ZeRO-3's reduce-scatter path (``__avg_scatter_grads``, taken with ``reduce_scatter`` or
    a bucket larger than ``reduce_bucket_size``) averages over both, unlike its all-reduce path
    and ZeRO-1/2, so gradients came out divided by the Ulysses degree. Scale that path's
    partitions back."""
    opt = engine.optimizer
    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    scatter, sp = getattr(opt, name), opt.sequence_parallel_size

    @functools.wraps(scatter)
    def summed(params, communication_data_type):
        return [g.mul_(sp) for g in scatter(params, communication_data_type)]

    setattr(opt, name, summed)


def record_fp32_grad_norm(engine) -> None:
    """DeepSpeed's ZeRO-0 fp32 path clips but drops the norm it computed, and applies a step with
    NaN/inf gradients (its ZeRO and fp16 optimizers skip those). Replace ``clip_fp32_gradients``
    to keep the norm in ``_global_grad_norm`` (what ``get_global_grad_norm`` returns) and mark a
    non-finite one as an overflow; guard the optimizer's ``step`` on it: the engine then skips the
    update and the LR step and counts it in ``skipped_steps``, as for its own optimizers."""
    from megallama.train.grad_norm import clip_, global_norm

    opt = engine.optimizer
    mpu = _PipelineNormGroups(engine.mpu) if hasattr(engine.mpu, "get_slice_parallel_rank") else engine.mpu
    alone = not dist.is_initialized() or dist.get_world_size() == 1

    def clip_and_record():
        # the norm in fp64 (megallama/train/grad_norm.py: torch's and DeepSpeed's clip_grad_norm_
        # sum fp32 squares, 2e-5 off on the tiny encoder-decoder); a later pipeline stage's copy of
        # a tied weight (``ds_pipe_replicated``) holds the same all-reduced gradient as the first
        # stage's: counted once, clipped alike
        params = [p for p in engine.module.parameters() if p.grad is not None]
        own = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
        norm = global_norm(own, engine.device, None if alone else mpu)
        clip_([p.grad for p in params], engine.gradient_clipping(), norm)
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


def fp64_cpu_norms() -> None:
    """DeepSpeed's bf16 optimizer and its unfused fp16/bf16 wrapper take each gradient's (the
    unfused one: the whole flattened group's) 2-norm in fp32, and on the CPU torch sums those
    squares in running fp32 accumulators, so the norm drifts with the tensor's size
    (megallama/train/grad_norm.py). Where the tensors are on the CPU, they are handed each tensor's
    norm taken in fp64 instead, as a one-element tensor carrying the attributes their filters read
    (pipeline-replicated, TP-sharded); their sums across tensors and ranks are unchanged. Module
    attributes, looked up at each call: process-wide, once; GPU tensors pass through untouched."""
    import deepspeed.runtime.bf16_optimizer as bf16
    import deepspeed.runtime.fp16.unfused_optimizer as unfused

    for module, name in ((bf16, "get_global_norm_of_tensors"), (unfused, "get_weight_norm")):
        fn = getattr(module, name)
        if not getattr(fn, "megallama_fp64", False):
            setattr(module, name, _fp64_on_cpu(fn))


NORM_ATTRS = ("ds_pipe_replicated", "tensor_model_parallel", "model_parallel")


def _fp64_on_cpu(fn: Callable) -> Callable:
    import inspect

    from megallama.train.grad_norm import square_sum

    signature = inspect.signature(fn)
    first = next(iter(signature.parameters))   # input_tensors / parameters

    def proxy(t: torch.Tensor) -> torch.Tensor:
        norm = square_sum([t], t.device).sqrt().float().reshape(1)
        for attr in NORM_ATTRS:
            if hasattr(t, attr):
                setattr(norm, attr, getattr(t, attr))
        return norm

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        tensors = bound.arguments[first]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if float(bound.arguments["norm_type"]) == 2.0 and tensors and all(t.device.type == "cpu" for t in tensors):
            bound.arguments[first] = [proxy(t) for t in tensors]
        return fn(*bound.args, **bound.kwargs)

    wrapped.megallama_fp64 = True
    return wrapped


class _PipelineNormGroups:
    """The norm counts a parameter that TP replicates (the RMSNorm weights) only where
    ``get_model_parallel_rank() == 0`` (DeepSpeed's rule); the pipeline grid's model-parallel rank spans
    stages, so every stage but the first left its norm weights out of the norm (and the clip)."""

    def __init__(self, grid):
        self.grid = grid

    def get_model_parallel_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()  # the TP rank within this stage

    def get_model_parallel_group(self):
        return self.grid.get_model_parallel_group()  # the sum still spans every stage and TP rank


def loss_scale(engine):
    """The fp16 loss scale (``cur_scale`` on the optimizer or its ``loss_scaler``), or None."""
    opt = getattr(engine, "optimizer", None)
    scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


# ----------------------------------------------------------------------- optimizer state export
def relink_optimizer_fragments(engine) -> None:
    """DeepSpeed links each parameter to its optimizer-state fragments once, right after the first
    step of the first param group, so later groups (our undecayed norms) stay unlinked. Clearing
    ``_hp_optimizer_states_linked`` makes its lazy initialiser link them all again."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def holds_fp32_state(p) -> bool:
    """DeepSpeed keeps this parameter's fp32 master and moments (ZeRO-3's ``ds_id``, the ZeRO 1/2
    and bf16 optimizers' ``_hp_mapping``): its ``safe_*_full_*`` helpers reach them."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def is_fp16_wrapper(opt) -> bool:
    """DeepSpeed's FP16 optimizers (fused and unfused) keep Adam's state where no helper exports it."""
    return type(opt).__name__.startswith("FP16")


# ------------------------------------------------------------------------ wrapping for a while
@contextlib.contextmanager
def wrapped_checkpoint_writes(engine, wrap_save: Callable, wrap_copy: Callable) -> Iterator[None]:
    """``save_checkpoint`` writes every file through ``checkpoint_engine.save`` and copies its
    recovery script with ``_copy_recovery_script``; each is replaced on the instance by
    ``wrap_*(real)`` while the block runs."""
    ce = engine.checkpoint_engine
    ce.save, engine._copy_recovery_script = wrap_save(ce.save), wrap_copy(engine._copy_recovery_script)
    try:
        yield
    finally:
        del ce.save, engine._copy_recovery_script


@contextlib.contextmanager
def wrapped_pipeline_instructions(engine, wrap: Callable) -> Iterator[None]:
    """The pipeline engine runs each schedule instruction through its class's ``_INSTRUCTION_MAP``;
    an instance copy of ``{kind: wrap(kind, fn)}`` takes its place while the block runs."""
    engine._INSTRUCTION_MAP = {kind: wrap(kind, fn) for kind, fn in type(engine)._INSTRUCTION_MAP.items()}
    try:
        yield
    finally:
        del engine._INSTRUCTION_MAP


def gradients_final_at(engine) -> List[str]:
    """Engine methods entered once a step's last backward is done, before gradients are reduced:
    ``allreduce_gradients``; ``step`` when the DP all-reduce is skipped; the pipeline engine's
    ``_bf16_reduce_grads`` under its bf16 optimizer."""
    names = ["allreduce_gradients"]
    if not getattr(engine, "enable_backward_allreduce", True):
        names.append("step")
    if hasattr(engine, "_bf16_reduce_grads"):
        names.append("_bf16_reduce_grads")
    return names


def cached_comm_functions() -> List[Tuple[object, str, str]]:
    """``(object, attribute, torch.distributed name)`` of the collectives ``deepspeed.comm``
    cached on its backend object at init (so wrapping ``torch.distributed`` misses them)."""
    from deepspeed.comm import comm as ds_comm

    cdb = getattr(ds_comm, "cdb", None)
    return [(cdb, attr, name) for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                                                 ("reduce_scatter_function", "reduce_scatter_tensor"))
            if cdb is not None and getattr(cdb, attr, None) is not None]
