"""The DeepSpeed section as typed settings, and what megallama's engine makes of them.

:class:`DeepSpeedSettings` is the one reader of the DeepSpeed dict's keys: the engine, the fit
check, the profiler and the cost models ask it, not the dict. :class:`EngineTraits` is the one
statement of which optimizer DeepSpeed wraps ours in and what megallama changes in the engine;
``train/engine.py`` applies exactly the patches it names, and the memory and communication
models read it instead of re-deriving the engine's rules. Pure: imports neither torch nor
DeepSpeed, so the planner runs without them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Buckets:
    """ZeRO's bucket settings as DeepSpeed reads them (elements); the defaults are DeepSpeed's."""

    reduce: int = int(5e8)                 # reduce_bucket_size
    overlap_comm: Optional[bool] = None    # None: DeepSpeed's default, on at stage 3 only
    reuse_distance: float = 1e9            # stage3_max_reuse_distance

    def overlaps(self, zero_stage: int) -> bool:
        return zero_stage == 3 if self.overlap_comm is None else self.overlap_comm


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a DeepSpeed dict (a run's ``deepspeed:`` section or ``build_ds_config``'s result) asks for."""

    zero_stage: int = 0
    precision: str = "fp32"
    offload_optimizer: Optional[str] = None   # 'cpu', 'nvme', or None (on the accelerator)
    offload_param: Optional[str] = None
    buckets: Buckets = field(default_factory=Buckets)

    @classmethod
    def of(cls, ds: Optional[Dict[str, Any]]) -> "DeepSpeedSettings":
        ds = ds or {}
        zero = ds.get("zero_optimization") or {}
        precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") \
            else "fp32"
        buckets = Buckets(reduce=int(zero.get("reduce_bucket_size", Buckets.reduce)),
                          overlap_comm=zero.get("overlap_comm"),
                          reuse_distance=float(zero.get("stage3_max_reuse_distance", Buckets.reuse_distance)))
        return cls(zero_stage=int(zero.get("stage", 0)), precision=precision,
                   offload_optimizer=_offload_device(zero, "offload_optimizer"),
                   offload_param=_offload_device(zero, "offload_param"), buckets=buckets)

    @property
    def offloaded(self) -> bool:
        return self.offload_optimizer is not None or self.offload_param is not None


def _offload_device(zero: Dict[str, Any], key: str) -> Optional[str]:
    """``device: none`` (DeepSpeed's default) and an absent or empty section keep it on the accelerator."""
    device = (zero.get(key) or {}).get("device", "none")
    return None if device in (None, "none") else str(device)


def predicted_optimizer(zero_stage: int, precision: str, pipeline: bool) -> str:
    """What DeepSpeed 0.19 wraps a client torch optimizer in: ``zero`` (stages 1-3), ``torch``
    (ZeRO-0 fp32: ours, stepped as is), ``bf16`` (``BF16_Optimizer``: ZeRO-0 bf16 under the
    pipeline engine), ``unfused`` (``FP16_UnfusedOptimizer``: ZeRO-0 fp16, or bf16 without a
    pipeline)."""
    if zero_stage > 0:
        return "zero"
    if precision == "fp32":
        return "torch"
    return "bf16" if precision == "bf16" and pipeline else "unfused"


@dataclass(frozen=True)
class EngineTraits:
    """The engine a layout runs as: DeepSpeed's optimizer and the patches megallama applies
    (``megallama.train.deepspeed_patches``), each a property so it is decided in one place."""

    zero_stage: int
    precision: str
    optimizer: str      # see predicted_optimizer
    dp: int             # ranks gradients are reduced and ZeRO state partitioned over: data x Ulysses
    pipeline: bool
    ulysses: int = 1

    @classmethod
    def predict(cls, zero_stage: int, precision: str, dp: int, pp: int) -> "EngineTraits":
        """The traits ``build_engine`` will record for this layout (no engine needed)."""
        return cls(zero_stage, precision, predicted_optimizer(zero_stage, precision, pp > 1), dp, pp > 1)

    @property
    def effective_zero(self) -> int:
        """``BF16_Optimizer`` shards the fp32 masters and Adam moments over DP exactly as ZeRO-1 does."""
        return 1 if self.optimizer == "bf16" else self.zero_stage

    @property
    def skips_dp_allreduce(self) -> bool:
        """One DP rank at ZeRO-0: DeepSpeed would all-reduce every gradient with itself; skipped
        (ZeRO-1+ and the bf16 optimizer move gradients into their own buffers on that path)."""
        return self.dp == 1 and not self.pipeline and self.zero_stage == 0 and self.optimizer != "bf16"

    @property
    def sums_zero3_sequence_grads(self) -> bool:
        """ZeRO-3's reduce-scatter path averages over the Ulysses ranks it should sum over."""
        return self.zero_stage == 3 and self.ulysses > 1

    @property
    def clips_fp32(self) -> bool:
        """DeepSpeed steps our AdamW itself: megallama records the norm and skips non-finite steps."""
        return self.optimizer == "torch"

    @property
    def resets_unfused_warmup(self) -> bool:
        """``FP16_UnfusedOptimizer``'s warm-up step on zero gradients is undone."""
        return self.optimizer == "unfused"

    @property
    def norms_in_fp64(self) -> bool:
        """DeepSpeed's bf16 and unfused optimizers take fp32 norms, which drift on the CPU."""
        return self.optimizer in ("bf16", "unfused")
