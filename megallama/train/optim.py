"""The LLaMA recipe: AdamW (0.9, 0.95, wd 0.1, none on norms and biases), linear warm-up, then
``train.lr_schedule``: cosine decay to ``min_lr_ratio`` of the peak (LLaMA's), linear decay,
constant, WSD (warmup-stable-decay, MiniCPM's and Megatron's: the peak until the last
``lr_decay_fraction`` of the steps, then a linear decay, the shape Hägele et al. 2024 found as
good as cosine) or inverse square root (T5/fairseq's, floored at ``min_lr_ratio`` as Megatron's).

Every schedule is a factor of the peak LR after ``step`` scheduler steps (``step`` 0 is the
first optimizer step); decays end at ``train.steps``."""
from __future__ import annotations

import math
from typing import Callable, Iterable, List

import torch
from torch.optim.lr_scheduler import LambdaLR

from megallama.config import TrainConfig


def param_groups(named_params: Iterable, weight_decay: float) -> List[dict]:
    """Decay matrices only: 1-D tensors (norm gains, biases) are left undecayed. ZeRO-3
    partitions parameters into flat shards, so the logical shape is read from ``ds_shape``."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _implementation(groups: List[dict]) -> dict:
    """torch's fused AdamW kernel (one pass over each tensor) when every parameter is on the CPU,
    else the multi-tensor ``foreach`` path. On CUDA, fused also needs every ``step`` state on the
    parameter's device, which checkpoint code that creates state by hand does not promise (it
    builds ``step`` on the CPU), so GPUs keep ``foreach``."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model.named_parameters(), t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **_implementation(groups))


def _after_warmup(t: TrainConfig) -> Callable[[int], float]:
    """The schedule's factor for a step past the warm-up."""
    warmup, total, floor = t.warmup_steps, max(t.steps, 1), t.min_lr_ratio

    def progress(step: int, begin: int) -> float:  # 0 -> 1 over [begin, total]
        return min(1.0, max(0.0, (step - begin) / max(1, total - begin)))

    if t.lr_schedule == "cosine":
        return lambda s: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress(s, warmup)))
    if t.lr_schedule == "linear":
        return lambda s: floor + (1.0 - floor) * (1.0 - progress(s, warmup))
    if t.lr_schedule == "constant":
        return lambda s: 1.0
    if t.lr_schedule == "wsd":
        decay_from = total - t.decay_steps
        return lambda s: floor + (1.0 - floor) * (1.0 - progress(s, decay_from))
    if t.lr_schedule == "inverse_sqrt":  # 1 at step number max(warmup, 1), continuing the warm-up's last factor
        return lambda s: max(floor, math.sqrt(max(warmup, 1) / (s + 1)))
    raise ValueError(f"train.lr_schedule: unknown schedule {t.lr_schedule!r}")


def lr_lambda(t: TrainConfig) -> Callable[[int], float]:
    warmup, after = t.warmup_steps, _after_warmup(t)

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return after(step)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(t))
