"""A run's own prediction: its config as the cost models' layout, costed on the hardware it runs on.

Why here and not in the trainer's metrics: ``train`` prints it at start and checks it every step,
``validate --gpu`` refuses a layout with it, ``micro_batch_size: auto`` searches with it and the
fit check refuses with its memory figure -- one question ("what will this config cost on this
device?") asked four ways, so it is answered once. The layout is :func:`profiling.compare.layout_of`
(what ``megallama profile`` compares against), never a second mapping; whether it fits a GPU is
:func:`run_verdict`, the verdict ``plan`` and ``estimate`` give (profiling/overheads.py), never a
second rule.

On CPU the device is measured as the run's ranks share it, at start (:func:`measure_at_start`):
a single-process GEMM peak, or the profile's assumed link, is nothing like two ranks on busy
cores talking over gloo. A tiny model's step also holds work the FLOP and byte terms do not see
(Python and DeepSpeed's per-step bookkeeping, the loss all-reduce, the record written), which a
GPU's asynchronous launches hide: :data:`CPU_STEP_WORK` adds it on CPU only, as the GEMM FLOPs it
takes as long as, so it slows with the measured rate as the cores get busier
(benchmarks/README_planner.md, "Predicted vs measured in every run").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from megallama.config.topology import ParallelDims
from megallama.errors import UserError
from megallama.profiling.hardware import HardwareProfile
from megallama.profiling.layout import Layout
from megallama.profiling.memory import MemoryBreakdown
from megallama.profiling.overheads import MemoryVerdict
from megallama.profiling.steptime import StepPrediction


# per-step CPU work outside the cost model, in GEMM-FLOP equivalents: the median over 14 tiny runs
# (7 layouts, twice) of (measured - predicted step) x the GEMM rate measured at their start
CPU_STEP_WORK = 1.7e9
# of RAM per rank ``micro_batch_size: auto`` fills on CPU with the counted tensors: the rest is left
# to the interpreter and its libraries, which no model counts (a GPU's overheads are the verdict's)
AUTO_SHARE = 0.92


@dataclass
class RunPrediction:
    """What the run is predicted to take on ``hardware`` (per rank: the worst pipeline stage)."""

    hardware: str
    hardware_source: str
    layout: Layout
    step: StepPrediction
    memory: MemoryBreakdown
    verdict: MemoryVerdict           # the fit: bytes per rank (on a GPU with its overheads) against the usable
    capacity_source: str
    cpu_step_work_s: float = 0.0     # :data:`CPU_STEP_WORK` at this CPU's measured rate (0 on a GPU)

    @property
    def memory_bytes(self) -> float:
        return self.verdict.needed_bytes

    @property
    def capacity_bytes(self) -> float:
        return self.verdict.usable_bytes

    @property
    def step_time_s(self) -> float:
        return self.step.step_time_s + self.cpu_step_work_s

    @property
    def tokens_per_s(self) -> float:
        return self.step.tokens_per_step / self.step_time_s

    @property
    def fits(self) -> bool:
        return self.verdict.fits

    def line(self) -> str:
        """The start line: what to expect, on which hardware."""
        from megallama.train.fits import fmt_bytes

        return (f"predicted on {self.hardware} for {self.layout.describe()}: {self.tokens_per_s:,.0f} tokens/s, "
                f"step {self.step_time_s:.4g} s, peak memory {fmt_bytes(self.memory_bytes)} per rank "
                f"of {fmt_bytes(self.capacity_bytes)} ({self.capacity_source})")

    def as_dict(self) -> Dict[str, Any]:
        return {"hardware": self.hardware, "hardware_source": self.hardware_source, "describe": self.layout.describe(),
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "memory_bytes": self.memory_bytes, "capacity_bytes": self.capacity_bytes, "fits": self.fits,
                "memory_overhead_bytes": dict(self.verdict.overheads),
                "time_breakdown_s": {**self.step.time, "cpu_step_work": self.cpu_step_work_s},
                "memory_breakdown_bytes": dict(self.memory.components)}


def run_layout(cfg: Any, world_size: int) -> Tuple[Layout, Dict[str, Any]]:
    """The layout ``cfg`` runs as on ``world_size`` ranks, and the DeepSpeed dict it hands the engine."""
    from megallama.profiling.compare import layout_of
    from megallama.train.ds_config import build_ds_config

    p = cfg.parallel
    ds = build_ds_config(cfg, world_size)
    dims = ParallelDims(tp=p.tp, pp=p.pp, dp=world_size // p.model_ranks, sequence_parallel=p.sequence_parallel,
                        ulysses=p.ulysses)
    return layout_of(cfg, dims, ds), ds


def with_micro_batch(cfg: Any, mbs: int) -> Any:
    """``cfg`` with ``train.micro_batch_size`` set (the config itself is left alone)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": mbs})})


def stage_memory(cfg: Any, layout: Layout, ds: Dict[str, Any], device_type: str,
                 stage: Optional[int] = None) -> MemoryBreakdown:
    """One pipeline stage's peak breakdown (None: the worst stage's) with this DeepSpeed config's
    buckets; on CPU a bucket holds at most this rank's gradients (untouched pages cost no RAM)."""
    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.compare import impl_of
    from megallama.profiling.memory import memory_breakdown, params_per_rank
    from megallama.train.ds_settings import DeepSpeedSettings

    spec = ArchSpec.from_model_config(cfg.model)
    buckets = DeepSpeedSettings.of(ds).buckets
    if device_type == "cpu":
        shard = math.ceil(params_per_rank(spec, layout.tp, layout.pp))
        buckets = dataclasses.replace(buckets, reduce=min(buckets.reduce, shard))
    return memory_breakdown(spec, layout, cfg.train.seq_len, stage, impl_of(cfg, device_type), buckets)


def run_verdict(cfg: Any, layout: Layout, ds: Dict[str, Any], hw: Optional[HardwareProfile],
                capacity: float = 0.0) -> Tuple[MemoryBreakdown, MemoryVerdict]:
    """(the worst stage's breakdown, whether one rank fits). On a GPU profile ``hw`` the verdict
    ``plan`` and ``estimate`` give: the counted tensors plus the device's overheads (CUDA context,
    cuBLAS workspaces, NCCL buffers, fragmentation) against its usable bytes. On CPU (``hw`` None)
    the tensors and their host copies (the same RAM) against ``capacity``: no overheads counted."""
    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.compare import impl_of
    from megallama.profiling.overheads import verdict

    device_type = "cpu" if hw is None else "cuda"
    mem = stage_memory(cfg, layout, ds, device_type)
    if hw is None:
        return mem, MemoryVerdict(needed_bytes=mem.total + mem.host_bytes, usable_bytes=capacity)
    return mem, verdict(ArchSpec.from_model_config(cfg.model), layout, cfg.train.seq_len, hw, mem,
                        impl_of(cfg, device_type))


def stage_breakdowns(cfg: Any, layout: Layout, ds: Dict[str, Any], device_type: str) -> List[MemoryBreakdown]:
    """Every distinct pipeline stage's peak breakdown (first, middle, last), for a refusal to show."""
    from megallama.profiling.arch import ArchSpec

    return [stage_memory(cfg, layout, ds, device_type, s)
            for s in layout.stage_groups(ArchSpec.from_model_config(cfg.model))]


def measure_at_start(rt: Any) -> Tuple[Optional[Dict[str, float]], Tuple[float, str]]:
    """``train``'s start, on every rank (each must call): (on CPU this machine as the run's ranks
    share it, None on a GPU; MFU's peak per rank and where it comes from). The CPU's GEMM is timed
    once, on every rank at once (``megallama profile``'s measurement, shorter): the prediction costs
    with that rate, and it is the peak MFU divides by unless an earlier run's is cached for this CPU,
    dtype, threads and ranks per node (a cached peak keeps runs' MFU comparable; without one the
    GEMM is timed longer, to cache a steadier figure). Rank 0 reads and writes the cache alone: a
    file, whatever the model or world size."""
    from megallama.profiling.harness import _cpu_rates
    from megallama.train import metrics
    from megallama.train.distributed import on_rank0_then_share
    from megallama.train.ds_config import precision
    from megallama.train.fits import ranks_on_this_node

    dtype = precision(rt.ds)
    if rt.device.type != "cpu":
        return None, on_rank0_then_share(lambda: metrics.device_peak_flops(dtype))
    ranks = ranks_on_this_node(rt.info.world_size)
    cached = on_rank0_then_share(lambda: metrics.cached_cpu_peak(dtype, ranks))
    rates = _cpu_rates(rt, 0.1 if cached else 0.5)
    return rates, cached or on_rank0_then_share(lambda: metrics.cpu_peak_flops(dtype, ranks, rates["gemm_flops"]))


def local_hardware(precision: str, rates: Optional[Dict[str, float]] = None) -> Tuple[HardwareProfile, str]:
    """(profile, where it came from) of the device this process runs on: on a GPU its profile by
    name; on CPU the measured profile -- ``rates`` (:func:`measure_at_start`) where given, as
    ``megallama profile`` takes them (profiling/report.py), else the cached GEMM peak MFU divides by."""
    import torch

    from megallama.profiling import hardware
    from megallama.profiling.steptime import Efficiency
    from megallama.profiling.detect import detect
    from megallama.train.metrics import cpu_peak_flops

    if torch.cuda.is_available():   # by the device's exact name: an H100 PCIe is not costed as an SXM
        found = detect()
        if found is None or found.profile is None:
            raise UserError(found.reason if found else "no device found to cost the run on")
        return hardware.load_hardware(found.profile), found.reason
    if not rates:
        peak, source = cpu_peak_flops(precision)
        return hardware.cpu_profile_of({k: peak for k in ("fp32", "bf16", "fp16")},
                                       hardware.measure_cpu_memory_bandwidth()), source
    hw = hardware.cpu_profile_of({k: rates["gemm_flops"] for k in ("fp32", "bf16", "fp16")},
                                 rates["memory_bandwidth"])
    source = (f"CPU measured at start on all {rates['ranks']} ranks at once: GEMM {rates['gemm_flops'] / 1e9:.1f} "
              f"GFLOP/s, copy {rates['memory_bandwidth'] / 1e9:.1f} GB/s per rank")
    if "bus_bandwidth" in rates:
        hw = dataclasses.replace(hw, intra_node_bandwidth=rates["bus_bandwidth"] / Efficiency().bus,
                                 intra_node_latency_s=rates["latency_s"])
        source += f", gloo {rates['latency_s'] * 1e6:.0f} us per ring step"
    return hw, source


def predict_run(cfg: Any, world_size: int, hardware: Optional[Tuple[HardwareProfile, str]] = None,
                rates: Optional[Dict[str, float]] = None) -> RunPrediction:
    """``cfg`` on ``world_size`` ranks of ``hardware`` (default: this process's device, and the fit
    the start-up check makes on it; a named GPU's fit is the planner's verdict)."""
    import torch

    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.compare import impl_of
    from megallama.profiling.steptime import predict
    from megallama.train.ds_config import precision
    from megallama.train.fits import device_capacity

    layout, ds = run_layout(cfg, world_size)
    if hardware is None:
        hw, source = local_hardware(precision(ds), rates)
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        gpu, cap, where = device_capacity(world_size, index)
    else:
        (hw, source), cap = hardware, 0.0
        gpu, _, where = device_capacity(world_size, hardware=hw)
    device_type = "cpu" if gpu is None else "cuda"
    mem, fit = run_verdict(cfg, layout, ds, gpu, cap)
    step = predict(ArchSpec.from_model_config(cfg.model), layout, cfg.train.seq_len, hw,
                   impl=impl_of(cfg, device_type), scatter_gather="deepspeed", memory=mem)
    work = CPU_STEP_WORK / hw.peak(layout.dtype) if device_type == "cpu" else 0.0
    return RunPrediction(hw.name, source, layout, step, mem, fit, where, work)


def auto_capacity(world_size: int) -> Tuple[float, str]:
    """Bytes per rank ``micro_batch_size: auto`` fills on CPU: :data:`AUTO_SHARE` of physical RAM
    over this node's ranks (not the RAM free now, which moves: every rank must choose alike)."""
    import os

    from megallama.train.fits import fmt_bytes, ranks_on_this_node

    ranks = ranks_on_this_node(world_size)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks
    where = "this machine's RAM" + (f" over {ranks} ranks" if ranks > 1 else "")
    return total * AUTO_SHARE, f"{AUTO_SHARE:.0%} of {fmt_bytes(total)} ({where})"


def choose_micro_batch(cfg: Any, world_size: int,
                       hardware: Optional[HardwareProfile] = None) -> Tuple[Any, Optional[str]]:
    """``train.micro_batch_size: auto``: the largest micro-batch dividing the global batch's share
    of one replica (with ``grad_accum_steps`` given, the one it leaves; under a ramp, one dividing
    its start and increment too) that fits: on a GPU (``hardware``, else this process's first) by
    :func:`run_verdict`, on CPU within :func:`auto_capacity`. Returns the config with it set and the
    sentence the start line states; a number is left as it is."""
    import torch

    from megallama.config.fields import ConfigError
    from megallama.errors import UserError
    from megallama.train.fits import device_capacity, fmt_bytes

    t = cfg.train
    if t.micro_batch_size != "auto":
        return cfg, None
    if t.global_batch_size is None:
        raise ConfigError("train.micro_batch_size: auto needs train.global_batch_size (the micro-batch is chosen "
                          "among its divisors; without it the largest that fits would set the global batch)")
    dp = world_size // cfg.parallel.model_ranks
    if t.global_batch_size % dp:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by the data-parallel "
                          f"size {dp}")
    per_replica = t.global_batch_size // dp
    if t.grad_accum_steps is not None:
        candidates = [per_replica // t.grad_accum_steps] if per_replica % t.grad_accum_steps == 0 else []
    else:
        candidates = [m for m in range(per_replica, 0, -1) if per_replica % m == 0]
    if t.rampup_batch_size is not None:
        candidates = [m for m in candidates if all(x % (m * dp) == 0 for x in t.rampup_batch_size[:2])]
    if not candidates:
        raise ConfigError(f"train.micro_batch_size: auto: no micro-batch makes train.global_batch_size "
                          f"{t.global_batch_size} = micro x accumulation x data-parallel {dp}"
                          + (f" with train.grad_accum_steps {t.grad_accum_steps}" if t.grad_accum_steps else "")
                          + (" and divides train.rampup_batch_size's start and increment" if t.rampup_batch_size
                             else ""))
    if hardware is not None or torch.cuda.is_available():   # device 0's, so every rank chooses alike
        gpu, cap, where = device_capacity(world_size, 0, hardware)
    else:
        (cap, where), gpu = auto_capacity(world_size), None
    need = 0.0
    for mbs in candidates:
        chosen = with_micro_batch(cfg, mbs)
        layout, ds = run_layout(chosen, world_size)
        fit = run_verdict(chosen, layout, ds, gpu, cap)[1]
        need = fit.needed_bytes
        if fit.fits:
            accum = per_replica // mbs
            return chosen, (f"train.micro_batch_size: auto chose {mbs} (x {accum} accumulation x {dp} data-parallel "
                            f"= global batch {t.global_batch_size}): predicted peak {fmt_bytes(need)} per rank"
                            + (f" with the device's overheads; {where}" if gpu is not None else f" of {where}")
                            + (f"; {candidates[candidates.index(mbs) - 1]} would not fit"
                               if mbs != candidates[0] else ""))
    raise UserError(f"train.micro_batch_size: auto: even {candidates[-1]} sequence(s) of {t.seq_len} tokens need about "
                    f"{fmt_bytes(need)} per rank" + (f" with the device's overheads but {where}" if gpu is not None
                                                     else f", above {where}")
                    + "; lower train.seq_len, set train.activation_checkpointing.mode, or shard the model "
                      "(parallel.tp, parallel.pp, ZeRO)")
