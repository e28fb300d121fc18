"""How fast the work of one block runs on one GPU, from the shapes it runs at and the machine.

Three kinds of work, each against the profile's physical fields:

* GEMMs (QKV, Wo, W1|W3, W2, the LM head; per rank, ``M`` tokens x ``N`` x ``K``): a roofline
  with both limits paid, ``2MNK / (peak * ceiling) + w (MK + KN + MN) / HBM bandwidth``. The
  second term is what makes small per-rank GEMMs (deep TP, small ``h``) run below the ceiling,
  and more so where the machine balance ``peak / bandwidth`` is higher (H100: ~295 FLOP/byte,
  A100-80GB: ~153). ``ceiling`` is the fitted fraction of the datasheet peak a large GEMM
  sustains on an A100, times the generation's sustained clock (:data:`SUSTAINED_CLOCK`).
* The attention core: with eager attention (Megatron) two batched GEMMs per head, ``s x s x d``
  and ``s x d x s``, on the same roofline (they are near the balance point: ``d`` = 128); with a
  flash kernel its counted FLOPs at the fraction of peak that kernel reaches on that generation
  (:data:`ATTENTION_KERNEL`): the exponentials and the softmax bookkeeping, not the matmuls, bound
  it, and they did not get faster in step with H100's tensor cores.
* Memory-bound kernels (norms, activations, softmax, casts, the optimizer) at HBM bandwidth:
  :mod:`megallama.profiling.steptime` charges them by bytes; the loss by its bytes per logit
  (:data:`LOSS_BYTES_PER_LOGIT`).

Communication runs at an achievable bus bandwidth that falls for small messages:
``bus * link * S / (S + message_half)`` for ``S`` bytes per call (:func:`achievable_bandwidth`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

# Fraction of the dense BF16/FP16 peak the flash-attention kernels of the published runs reach on
# the attention core's counted FLOPs (the whole ``s x s`` square, as MFU counts them), by GPU
# generation (the profile name before its first "-"). Fitted (benchmarks/README_planner.md); for
# scale, FlashAttention-2 reaches 50-73% of peak on A100 (Dao 2023, abstract) and ~35% on H100
# (Shah et al. 2024, "FlashAttention-3", abstract). Kernels and generations without a fit take
# the H100's (FA2-class kernels on a part whose tensor cores outrun its exponential units).
ATTENTION_KERNEL: Dict[str, float] = {"a100": 0.62, "h100": 0.36}
ATTENTION_KERNEL_DEFAULT = "h100"
# The tensor-core clock a training job sustains, relative to the A100's, by generation: the
# datasheet peaks assume boost clocks, and an H100 SXM at its 700 W cap does not hold them under
# dense GEMMs the way an A100 at 400 W does. Fitted (H100; the A100 is the reference, 1);
# generations without a fit take 1 (no evidence either way).
SUSTAINED_CLOCK: Dict[str, float] = {"a100": 1.0, "h100": 0.75}
# Compute seconds lost per second of ZeRO-3/FSDP exchange hidden behind it, by generation: NCCL's
# kernels run on the same SMs and HBM as the GEMMs they overlap, so a hidden gather is not free.
# Fitted on the published runs whose per-block exchange across nodes is close to their per-block
# compute (benchmarks/README_planner.md), with the NICs at their nominal bus bandwidth;
# generations without a fit take the H100's.
CONTENTION: Dict[str, float] = {"a100": 0.4, "h100": 0.14}
CONTENTION_DEFAULT = "h100"
SAME_SILICON = {"h200": "h100"}   # GH100 at the same 700 W: its H100's fitted figures
# HBM bytes per logit of a vocab-parallel cross-entropy, forward + backward: read the bf16 logits
# (2), write and re-read their fp32 softmax (4 + 4, the max and the sum folded into those passes),
# read it again in backward (4) and write the bf16 gradient (2), plus the fp32 upcast's round trip
# (4 + 4): 24. Counted, not fitted.
LOSS_BYTES_PER_LOGIT = 24.0
MESSAGE_HALF = 4.0 * 2 ** 20      # bytes per call at which NCCL reaches half its bus bandwidth (assumed)


@dataclass(frozen=True)
class Gemm:
    """One matmul of a block's forward on one rank: ``m x k`` times ``k x n``, ``count`` times."""

    name: str
    m: float
    n: float
    k: float
    count: float = 1.0

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


def gemm_seconds(g: Gemm, peak: float, bandwidth: float, dtype_bytes: int, ceiling: float) -> float:
    """Roofline time of ``g``: compute at ``ceiling`` of peak plus its operands and output at HBM
    speed. The backward's two GEMMs are permutations of the same ``M, N, K``: the same time each."""
    traffic = dtype_bytes * (g.m * g.k + g.k * g.n + g.m * g.n) * g.count
    return g.flops / (peak * ceiling) + traffic / bandwidth


def intensity(g: Gemm, dtype_bytes: int = 2) -> float:
    """FLOPs per HBM byte of one call (compare with the machine balance ``peak / bandwidth``)."""
    return 2.0 * g.m * g.n * g.k / (dtype_bytes * (g.m * g.k + g.k * g.n + g.m * g.n))


def block_gemms(spec, tokens: float, tp: int) -> List[Gemm]:
    """A decoder block's projection and MLP GEMMs on one TP rank for ``tokens`` tokens (with
    sequence parallelism the linears run on the gathered sequence: the same ``M``)."""
    hd, d = spec.head_dim, spec.dim
    q = spec.n_heads * hd / tp
    kv = max(spec.kv_heads // tp, 1) * hd        # fewer KV heads than ranks: one replicated head each
    f = spec.ffn_hidden / tp
    return [Gemm("qkv", tokens, q + 2 * kv, d), Gemm("wo", tokens, d, q),
            Gemm("mlp_in", tokens, f * (2 if spec.glu else 1), d), Gemm("mlp_out", tokens, d, f)]


def head_gemm(spec, tokens: float, tp: int) -> Gemm:
    return Gemm("lm_head", tokens, spec.vocab_size / tp, spec.dim)


def generation(hw) -> str:
    """``a100-80gb`` -> ``a100``; an H200 counts as the H100 it shares its silicon with."""
    gen = hw.name.split("-")[0]
    return SAME_SILICON.get(gen, gen)


def attention_kernel_fraction(hw, table: Dict[str, float] = ATTENTION_KERNEL) -> float:
    return table.get(generation(hw), table[ATTENTION_KERNEL_DEFAULT])


def cross_node_fraction(hw) -> float:
    """The profile's own ``cross_node_share`` (a cluster's measurement) where it states one, else
    the NICs' nominal bandwidth: one cluster's share does not carry to another's."""
    if hw.measured or hw.cross_node_share is None:
        return 1.0
    return hw.cross_node_share


def cross_node_statement(hw) -> str:
    """What a costing across nodes assumed of the links between nodes, and where that came from."""
    if hw.cross_node_share is None:
        return ("NICs costed at their nominal bandwidth (the profile states no measured cross_node_share; "
                "`megallama network` measures a cluster's)")
    return f"NICs costed at {hw.cross_node_share:g} of their nominal bandwidth (the profile's measured cross_node_share)"


def contention(hw, table: Dict[str, float] = CONTENTION) -> float:
    """:data:`CONTENTION` for ``hw``; a measured profile's own run already paid it."""
    return 0.0 if hw.measured else table.get(generation(hw), table[CONTENTION_DEFAULT])


def sustained_clock(hw, table: Dict[str, float] = SUSTAINED_CLOCK) -> float:
    return 1.0 if hw.measured else table.get(generation(hw), 1.0)


def seconds_per_flop(spec, tokens: float, seq: int, tp: int, hw, dtype: str, dtype_bytes: int, ceiling: float,
                     attention: str, flash_fraction: float) -> Tuple[float, float, float]:
    """Seconds per counted FLOP of (projections + MLP, attention core, LM head) on one rank.

    Counted FLOPs are :mod:`megallama.profiling.flops`'s (the full ``s x s`` square); a flash
    kernel runs them at ``flash_fraction`` of peak (:func:`attention_kernel_fraction`); on a
    measured profile (``cpu``: no flash kernel) attention runs as the eager GEMMs.
    """
    peak, bw = hw.peak(dtype), hw.memory_bandwidth
    if dtype == "fp8":   # costed only: the linears at the FP8 peak, the attention core in BF16 (below)
        peak = hw.peak("fp8")
    gemms = block_gemms(spec, tokens, tp)
    proj = sum(gemm_seconds(g, peak, bw, dtype_bytes, ceiling) for g in gemms) / sum(g.flops for g in gemms)
    head = head_gemm(spec, tokens, tp)
    head_rate = gemm_seconds(head, peak, bw, dtype_bytes, ceiling) / head.flops
    if dtype == "fp8":   # Transformer Engine's attention computes in BF16 unless FP8 attention is asked for
        peak = hw.peak("bf16")
    if attention == "flash" and not hw.measured:
        core = 1.0 / (peak * flash_fraction)
    else:   # QK^T and PV per head, over the whole square
        pair = [Gemm("scores", seq, seq, spec.head_dim), Gemm("pv", seq, spec.head_dim, seq)]
        core = sum(gemm_seconds(g, peak, bw, dtype_bytes, ceiling) for g in pair) / sum(g.flops for g in pair)
    return proj, core, head_rate


def achievable_bandwidth(link: float, bytes_per_call: float, bus: float, half: float = MESSAGE_HALF) -> float:
    """NCCL bus bandwidth for calls of ``bytes_per_call``: ``bus`` of the link for large messages,
    half of that at ``half`` bytes (latency and protocol overheads dominate small calls)."""
    return link * bus * bytes_per_call / (bytes_per_call + half)


def message_half(hw) -> float:
    """:data:`MESSAGE_HALF` is NCCL's; a measured profile's gloo has its costs in its latency."""
    return 0.0 if hw.measured else MESSAGE_HALF
