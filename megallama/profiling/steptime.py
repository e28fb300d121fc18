"""Predicted time of one training step for one layout: compute, exposed communication, bubble.

Per micro-batch, a pipeline stage takes

    matmuls (incl. recompute), each at the rate its shapes allow     (:mod:`.efficiency`)
  + elementwise HBM traffic / memory bandwidth        (norms, softmax, SwiGLU, dropout, loss)
  + its TP collectives + its pipeline sends            (synchronous: on the critical path)
  + its Ulysses all-to-alls; ring attention's sends beyond the attention core they overlap

where the elementwise traffic is ``traffic * saved-activation bytes`` per pass (forward,
backward ~ 2 passes, recomputed forward), since every saved tensor is written once and read
back by the kernels around it. With ``m`` micro-batches and ``v`` interleaved chunks, 1F1B takes
``m * t_max + (sum_s t_s - t_max) / v`` -- for equal stages ``(m + (pp-1)/v) t``, a bubble of
``(pp-1)/(v m)``; stages of unequal size (``Layout.stage_layers``) each take their own ``t_s``,
and the slowest sets the steady state. Then the data-parallel traffic after the last backward
(all of it for ZeRO 0-2, which DeepSpeed does not overlap by default; ZeRO-3 prefetches one
block ahead, so each block takes the longer of its compute and its exchange, and the kernels
contend, :func:`zero3_exposed`), and the optimizer step (HBM-bound Adam, or CPU
Adam + PCIe when offloaded). The fitted constants (:class:`Efficiency`) are calibrated against
published runs (:mod:`megallama.profiling.published_runs`); the rest are physical constants of
the profile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megallama.config.pipeline_split import describe_split
from megallama.profiling import activations as act
from megallama.profiling import efficiency as eff_mod
from megallama.profiling.arch import SpecLike, as_spec
from megallama.profiling.comm import comm_time_by_phase, zero3_part
from megallama.profiling.flops import FlopCount, flops_per_token
from megallama.profiling.hardware import HardwareProfile
from megallama.profiling.layout import Layout
from megallama.profiling.memory import MemoryBreakdown, memory_breakdown, params_per_rank
from megallama.profiling.overheads import MemoryVerdict, verdict
from megallama.profiling.sequence_comm import attention_core_seconds, ring_exposed


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the hardware's peaks. ``gemm``, ``traffic``, ``traffic_fused``,
    ``attention`` (the flash kernels' fraction of peak), ``clock`` (the sustained tensor-core
    clock, of the A100's) and ``contention`` (:data:`~megallama.profiling.efficiency.CONTENTION`),
    the last three by GPU generation, are what
    :func:`megallama.profiling.calibration.calibrate` finds on its fit rows (Megatron Table 1
    and MPT, A100 and H100; benchmarks/README_planner.md); the rest are physical or DeepSpeed's."""

    gemm: float = 0.78                      # large-GEMM FLOP/s / dense peak (efficiency.py's ceiling)
    traffic: float = 2.25                   # elementwise HBM bytes per saved-activation byte, per pass (eager PyTorch)
    traffic_fused: float = 2.0              # the same under Megatron's fused kernels (bias-GeLU, softmax, norms)
    bus: float = 0.80                       # NCCL bus bandwidth / link bandwidth
    optimizer_bytes_per_param: float = 36.0  # Adam: read/write master, m, v; read grad; write params
    cpu_adam_params_per_s: float = 1.0e9    # DeepSpeedCPUAdam per GPU's share of host cores
    attention: Tuple[Tuple[str, float], ...] = tuple(eff_mod.ATTENTION_KERNEL.items())   # flash, by generation
    clock: Tuple[Tuple[str, float], ...] = tuple(eff_mod.SUSTAINED_CLOCK.items())   # of the A100's, by generation
    contention: Tuple[Tuple[str, float], ...] = tuple(eff_mod.CONTENTION.items())   # compute lost per hidden comm s


@dataclass
class StepPrediction:
    layout: Layout
    seq: int
    step_time_s: float
    tokens_per_step: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float            # model FLOPs (MFU numerator)
    hardware_tflops_per_gpu: float   # incl. recompute (HFU numerator)
    mfu: float
    hfu: float
    memory: MemoryBreakdown
    memory_verdict: MemoryVerdict    # the counted tensors + device overheads against the usable bytes
    time: Dict[str, float] = field(default_factory=dict)
    stage_layers: List[int] = field(default_factory=list)   # blocks per pipeline stage
    slowest_stage: int = 0

    @property
    def fits(self) -> bool:
        return self.memory_verdict.fits

    @property
    def memory_capacity_bytes(self) -> float:
        return self.memory_verdict.usable_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_s_per_gpu * self.layout.world

    def as_dict(self) -> Dict[str, object]:
        return {"layout": self.layout.as_dict(), "describe": self.layout.describe(), "seq": self.seq,
                "step_time_s": self.step_time_s, "tokens_per_step": self.tokens_per_step,
                "tokens_per_s": self.tokens_per_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "tflops_per_gpu": self.tflops_per_gpu, "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu,
                "mfu": self.mfu, "hfu": self.hfu, "memory_per_gpu_bytes": self.memory.total,
                "memory_capacity_bytes": self.memory_capacity_bytes, "fits": self.fits,
                "memory_needed_bytes": self.memory_verdict.needed_bytes,
                "memory_margin_bytes": self.memory_verdict.margin_bytes,
                "memory_overhead_bytes": dict(self.memory_verdict.overheads),
                "memory_verdict": self.memory_verdict.describe(),
                "memory_breakdown_bytes": dict(self.memory.components), "host_memory_bytes": self.memory.host_bytes,
                "pipeline_stage_of_peak_memory": self.memory.stage, "time_breakdown_s": dict(self.time),
                "pipeline_stage_layers": list(self.stage_layers),
                "pipeline_split": describe_split(self.stage_layers), "pipeline_slowest_stage": self.slowest_stage}


def gemm_ceiling(hw: HardwareProfile, eff: Efficiency) -> float:
    """The fraction of ``hw``'s peak a large GEMM sustains: ``gemm`` at the generation's clock."""
    return eff.gemm * eff_mod.sustained_clock(hw, dict(eff.clock))


def _stage_compute(spec, layout: Layout, seq: int, hw: HardwareProfile, eff: Efficiency, fc: FlopCount,
                   stage: int, impl: act.ActivationImpl) -> float:
    """Seconds of compute for one micro-batch on one rank of ``stage``; ``fc``: the FLOPs the TP
    ranks run together (replicated KV heads included, :meth:`ArchSpec.tp_view`). Each kind of
    FLOP runs at its own rate (:func:`megallama.profiling.efficiency.seconds_per_flop`)."""
    tokens = seq * layout.mbs / layout.seq_shards   # attention per token is the whole sequence's
    tr = fc.terms
    core = tr["attn_core"] + tr["cross_core"] + tr["encoder_core"]
    rest = fc.forward - tr["lm_head"] - core
    redo_core = core if layout.recompute in ("full", "selective") else 0.0
    redo_rest = fc.recomputed - redo_core   # full: the whole block; op: every second matmul
    count = layout.stage_layers(spec)[stage]
    share = count / spec.n_layers * tokens / layout.tp
    proj_rate, core_rate, head_rate = eff_mod.seconds_per_flop(
        spec, tokens, seq, layout.tp, hw, layout.dtype, layout.dtype_bytes, gemm_ceiling(hw, eff), impl.attention,
        eff_mod.attention_kernel_fraction(hw, dict(eff.attention)))
    matmul = share * ((3 * rest + redo_rest) * proj_rate + (3 * core + redo_core) * core_rate)
    if stage == layout.pp - 1:
        matmul += tokens / layout.tp * 3 * tr["lm_head"] * head_rate
    t, sp, w, u, cp = layout.tp, layout.sp, layout.dtype_bytes, layout.ulysses, layout.cp
    kind = "cross" if spec.arch == "encoder_decoder" else "decoder"
    saved = act.activation_bytes_per_layer(spec, seq, layout.mbs, t, sp, "none", w, impl, kind, u, cp)
    redo = act.recomputed_bytes_per_layer(spec, seq, layout.mbs, t, sp, layout.recompute, w, impl, kind, u, cp)
    layers = count + (spec.n_encoder_layers if stage == 0 else 0)
    traffic = layers * (3 * saved + redo)
    loss = 0.0
    if stage == layout.pp - 1:   # the loss at its kernels' bytes per logit; the final norm as the blocks
        last = act.last_stage_saved_tensors(spec, seq // layout.seq_shards, layout.mbs, t, sp, w, impl)
        traffic += 3 * sum(x.bytes for x in last if not x.name.startswith("loss."))
        loss = tokens * spec.tp_view(t).vocab_size / t * eff_mod.LOSS_BYTES_PER_LOGIT
    per_byte = eff.traffic if impl.sp_saves_gathered_input else eff.traffic_fused   # False: Megatron's own
    return matmul + (per_byte * traffic + loss) / hw.memory_bandwidth


def forward_share(fc: FlopCount) -> float:
    """The forward's share of a micro-batch's FLOPs (the recomputed forward runs in backward)."""
    return fc.forward / (3 * fc.forward + fc.recomputed)


def zero3_exposed(z: Dict[str, float], compute: float, m: int, blocks: int, fwd: float,
                  contention: float = 0.0) -> float:
    """Seconds per micro-batch ZeRO-3's traffic adds to ``compute``: it prefetches one block
    ahead, so each block takes the longer of its compute and its exchange (forward: its gather;
    backward: the next block's gather and its own reduce-scatter, one link), plus ``contention``
    of whichever it hides (NCCL's kernels share the SMs and HBM); the first gather and last
    reduce-scatter have nothing to hide behind. ``z``: :func:`zero3_exchange`'s seconds per step
    (:func:`~megallama.profiling.comm.zero3_part` of the stage's one costing pass)."""
    if not any(z.values()):
        return 0.0
    n = max(blocks, 1)
    gather, back = z["gather"] / (m * n), (z["regather"] + z["reduce_scatter"]) / (m * n)
    rs = z["reduce_scatter"] / (m * n)
    per_block = sum(max(c, x) + contention * min(c, x)
                    for c, x in ((fwd * compute / n, gather), ((1 - fwd) * compute / n, back)))
    return n * per_block + gather + rs - compute


def predict(model: SpecLike, layout: Layout, seq: int, hw: HardwareProfile, eff: Efficiency = Efficiency(),
            impl: act.ActivationImpl = act.ActivationImpl(), scatter_gather=False,
            memory: Optional[MemoryBreakdown] = None) -> StepPrediction:
    """Step time, throughput, FLOP/s, MFU and peak memory of ``layout`` on ``hw`` (``memory``: a
    breakdown already computed for this layout, to save recomputing it)."""
    spec = as_spec(model)
    fc = flops_per_token(spec, seq, layout.recompute)
    fc_ranks = flops_per_token(spec.tp_view(layout.tp), seq, layout.recompute)
    m = layout.grad_accum
    groups = layout.stage_groups(spec)   # stage -> how many stages it stands for
    per_stage, step_comm = {}, {}
    flash = impl.attention == "flash" and not hw.measured   # the core's fraction of peak, as _stage_compute's
    core_rate = eff_mod.attention_kernel_fraction(hw, dict(eff.attention)) if flash else gemm_ceiling(hw, eff)
    cross = eff_mod.cross_node_fraction(hw)
    contention = eff_mod.contention(hw, dict(eff.contention))
    for s in groups:
        comm = comm_time_by_phase(spec, layout, seq, hw, s, eff.bus, impl, scatter_gather, cross)
        compute = _stage_compute(spec, layout, seq, hw, eff, fc_ranks, s, impl)
        ring = ring_exposed(comm.get("cp.ring", 0.0) / m, attention_core_seconds(spec, layout, seq, hw, core_rate, s))
        per_stage[s] = (compute, sum(comm.get(f"{g}.microbatch", 0.0) for g in ("tp", "pp", "kv", "ulysses")) / m
                        + ring)
        step_comm[s] = (comm.get("tp.step", 0.0) + comm.get("dp.step", 0.0) + comm.get("embedding.step", 0.0)
                        + m * zero3_exposed(zero3_part(comm), compute, m,
                                            layout.stage_layers(spec)[s], forward_share(fc), contention))
    totals = {s: sum(per_stage[s]) for s in groups}
    t_max = max(totals.values())
    t_sum = sum(totals[s] * n for s, n in groups.items())
    pipeline = m * t_max + (t_sum - t_max) / layout.interleave
    slowest = max(groups, key=lambda s: totals[s])
    compute_part = m * per_stage[slowest][0]
    comm_part = m * per_stage[slowest][1]
    dp_exposed = max(step_comm.values())
    optimizer = _optimizer_time(spec, layout, hw, eff)
    step = pipeline + dp_exposed + optimizer
    tokens = float(layout.global_batch * seq)
    tps_gpu = tokens / step / layout.world
    mem = memory if memory is not None else memory_breakdown(spec, layout, seq, impl=impl)
    peak = hw.peak(layout.dtype)
    return StepPrediction(
        layout=layout, seq=seq, step_time_s=step, tokens_per_step=tokens, tokens_per_s_per_gpu=tps_gpu,
        tflops_per_gpu=tps_gpu * fc.model / 1e12, hardware_tflops_per_gpu=tps_gpu * fc.hardware / 1e12,
        mfu=tps_gpu * fc.model / peak, hfu=tps_gpu * fc.hardware / peak, memory=mem,
        memory_verdict=verdict(spec, layout, seq, hw, mem, impl),
        time={"compute": compute_part, "tp_and_pp_comm": comm_part, "pipeline_bubble": pipeline - compute_part - comm_part,
              "dp_comm_exposed": dp_exposed, "optimizer": optimizer},
        stage_layers=layout.stage_layers(spec), slowest_stage=slowest)


def _optimizer_time(spec, layout: Layout, hw: HardwareProfile, eff: Efficiency) -> float:
    shard = (params_per_rank(spec, layout.tp, layout.pp, split=layout.stage_layers(spec))
             / (layout.zero_dp if layout.effective_zero >= 1 else 1))
    if layout.offload:   # grads down (fp32 after DeepSpeed's copy), updated params back up
        return shard / eff.cpu_adam_params_per_s + shard * (4 + layout.dtype_bytes) / hw.host_bandwidth
    return shard * eff.optimizer_bytes_per_param / hw.memory_bandwidth
