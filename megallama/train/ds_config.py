"""The DeepSpeed config a run hands to ``deepspeed.initialize``, derived from one place.

Batch sizes, clipping and precision come from the run config; the user's DeepSpeed dict may
repeat them, but a value that disagrees is an error rather than a silent override. Combinations
DeepSpeed would refuse deep inside ``initialize`` are refused here, in one line, before start-up.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from megallama.config import BatchLayout, ConfigError, RunConfig

_KNOWN_TOP = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown",
    "activation_checkpointing", "pipeline", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "tensorboard", "flops_profiler", "comms_logger", "checkpoint", "data_types", "seq_parallel_communication_data_type",
    "dump_state", "memory_breakdown", "amp", "sparse_gradients", "wandb", "csv_monitor", "elasticity",
    "aio", "compression_training", "autotuning", "data_efficiency", "timers", "torch_autocast",
}


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _agree(ds: Dict[str, Any], key: str, value: Any, source: str) -> None:
    if key in ds and ds[key] != value:
        raise ConfigError(f"deepspeed.{key}: {ds[key]} contradicts {source} = {value}")
    ds[key] = value


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(cfg: RunConfig, world_size: int) -> Dict[str, Any]:
    """A complete DeepSpeed config for ``world_size`` ranks (``cfg.deepspeed`` is not modified)."""
    ds = copy.deepcopy(cfg.deepspeed)
    for key in ds:
        if key not in _KNOWN_TOP:
            raise ConfigError(f"deepspeed.{key}: unknown DeepSpeed key{_did_you_mean(key, _KNOWN_TOP)}")
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError("deepspeed.optimizer: megallama builds AdamW and the LR schedule from train.*; "
                          "remove the optimizer/scheduler sections")
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp)
    layout: BatchLayout = cfg.train.batch_layout(dp)
    _agree(ds, "train_micro_batch_size_per_gpu", layout.micro, "train.micro_batch_size")
    _agree(ds, "gradient_accumulation_steps", layout.accum, "train.grad_accum_steps (derived)")
    _agree(ds, "train_batch_size", layout.global_, "train.global_batch_size (micro x accum x dp)")
    _agree(ds, "gradient_clipping", cfg.train.grad_clip, "train.grad_clip")
    ds.setdefault("steps_per_print", 10**9)  # our progress line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)

    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError("deepspeed.fp16: fp16 and bf16 cannot both be enabled")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got {stage}")
    if p.pp > 1 and stage >= 2:
        raise ConfigError(f"deepspeed.zero_optimization.stage: DeepSpeed's pipeline engine supports ZeRO "
                          f"stage 0 or 1, got {stage} with parallel.pp={p.pp}")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None) and stage == 0:
        raise ConfigError("deepspeed.zero_optimization.offload_optimizer: needs ZeRO stage 1, 2 or 3")
    if offload not in ("none", None):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if stage > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)
    ac = cfg.train.activation_checkpointing
    if ac.mode == "full":
        section = ds.setdefault("activation_checkpointing", {})
        section.setdefault("partition_activations", ac.partition_activations)
        section.setdefault("cpu_checkpointing", ac.cpu_checkpointing)
        section.setdefault("contiguous_memory_optimization", False)
        section.setdefault("number_checkpoints", cfg.model.n_layers)
    return ds


def check_device_supports(ds: Dict[str, Any]) -> None:
    """DeepSpeed's own check raises deep inside ``initialize``; say it in one line up front."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for kind, supported in (("fp16", acc.is_fp16_supported), ("bf16", acc.is_bf16_supported)):
        if ds.get(kind, {}).get("enabled") and not supported():
            raise ConfigError(f"deepspeed.{kind}: not supported by DeepSpeed's {acc.device_name()} accelerator "
                              f"on this machine (use {'bf16' if kind == 'fp16' else 'fp32'} here)")


def precision(ds: Dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
