"""Device memory outside the tensors :mod:`megallama.profiling.memory` counts, and the verdict.

Why: the model states and saved activations are counted tensor by tensor (byte-exact against
CPU runs), but a GPU run also pays for memory no tensor of the model owns. A verdict of "fits"
must subtract and add these, or layouts that died of OOM in published runs are proposed.

Per rank, on a GPU profile (a measured ``cpu`` profile pays none of them: its figures are
compared byte for byte with real runs, and RAM has no CUDA context):

* ``cuda_context``: the driver's context with the kernels a training step loads lazily (CUDA
  >= 11.7). Not allocatable, so it comes off the capacity rather than onto the need.
* ``cublas_workspace``: PyTorch keeps one cuBLAS workspace per (handle, stream); the forward
  thread and autograd's backward thread each hold one.
* ``nccl_buffers``: each NCCL communicator a rank joins allocates its own FIFOs per channel
  and peer (more communicators, more memory: NVIDIA/nccl#864, #986). Counted per communicator
  this rank is in: the world group, the model-parallel group (TP x PP, for the gradient norm),
  TP, DP (x the sequence shards), the Ulysses all-to-all, the embedding group of a tied model
  split over a pipeline, and one two-rank communicator per pipeline or ring neighbour (PyTorch
  opens one per pair for send/recv; interleaved 1F1B makes the first and last stage neighbours).
* ``attention_workspace``: eager attention materialises the pre-softmax scores in forward
  and their gradient in backward beside the saved probabilities (two score matrices of this
  rank's heads); flash attention's workspace is O(s) and its log-sum-exp is already counted.
* ``allocator``: the caching allocator's reserved-but-unallocated bytes (fragmentation) at the
  peak, as a fraction of the bytes that churn every step (activations and their workspace).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megallama.profiling.activations import ActivationImpl
from megallama.profiling.arch import SpecLike, as_spec
from megallama.profiling.hardware import HardwareProfile
from megallama.profiling.layout import Layout
from megallama.profiling.memory import MemoryBreakdown

MiB, GiB = 2 ** 20, 2 ** 30

# ptrblck in pytorch/pytorch#107667 (2023): "~300MB" for a bare context since CUDA 11.7's lazy
# module loading; pytorch/pytorch#28113: 200 to 700 MB by GPU. A training step loads NCCL,
# cuBLAS, attention and optimizer kernels on top of the bare context: the top of that range.
CUDA_CONTEXT_BYTES = 512 * MiB
# pytorch aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize(): ":4096:2:16:8"
# (4096 KiB x 2 + 16 KiB x 8) by default, 32 MiB (4096 KiB x 8) on Hopper and Blackwell.
CUBLAS_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_WORKSPACE_HOPPER_BYTES = 4096 * 1024 * 8
CUBLAS_WORKSPACE_MI300_BYTES = 1024 * 128 * 1024   # same file, ROCm: 128 MiB on gfx94x/gfx95x
CUBLAS_HANDLES = 2               # forward thread + autograd's backward thread
HOPPER_AND_LATER = ("h100", "h200", "h800", "gh200", "b100", "b200", "gb200")
MI300 = ("mi300", "mi325", "mi350", "mi355")
# NVIDIA/nccl#964 (4 x A100 with NVLink, PyTorch, one 4 MB all-reduce per process group):
# "for group with only 2 devices, it requires 544 MB. And for group with more than 2 devices,
# it requires 688 MB" per GPU, per communicator.
NCCL_COMM_BYTES = 688 * MiB
NCCL_PAIR_BYTES = 544 * MiB
# NVIDIA/nccl#1685 (8 x H100, one all_to_all_single): NCCL's own memory rose from 1.06 to
# 4.34 GB, 32 channels to each of 7 peers: per peer of an all-to-all.
NCCL_ALL_TO_ALL_PEER_BYTES = (4.34e9 - 1.06e9) / 7
# Caching-allocator fragmentation at the peak, as a share of the activations (and attention
# workspace) that are allocated and freed every step. Observed: 1.83 GiB reserved-but-unallocated
# beside 75.31 GiB allocated at an OOM (vllm-project/compressed-tensors#587, 2.4% of all
# bytes); 16.39 vs 10.83 GiB without/with expandable segments in a fine-tune
# (pytorch/torchtune#1185). The value sits inside the interval the published verdicts allow
# (megallama/profiling/published_memory.py, ``fragmentation_interval``).
FRAGMENTATION = 0.05


def cuda_context_bytes(hw: HardwareProfile) -> float:
    return 0.0 if hw.measured else float(CUDA_CONTEXT_BYTES)


def usable_bytes(hw: HardwareProfile) -> float:
    """What the allocator can have: the device's memory less the CUDA context."""
    return hw.memory_bytes - cuda_context_bytes(hw)


def cublas_workspace_bytes(hw: HardwareProfile) -> float:
    if hw.measured:
        return 0.0
    name = hw.name.lower()
    per_handle = (CUBLAS_WORKSPACE_MI300_BYTES if name.startswith(MI300) else
                  CUBLAS_WORKSPACE_HOPPER_BYTES if name.startswith(HOPPER_AND_LATER) else CUBLAS_WORKSPACE_BYTES)
    return float(CUBLAS_HANDLES * per_handle)


def communicators(layout: Layout, stage: int, tied: bool) -> List[Tuple[str, int, str]]:
    """(group, ranks, kind) of every NCCL communicator a rank of ``stage`` joins; kind is
    ``collective``, ``all_to_all`` or ``pair`` (send/recv with one neighbour)."""
    out: List[Tuple[str, int, str]] = []
    if layout.world > 1:
        out.append(("world", layout.world, "collective"))
    if layout.pp > 1:
        out.append(("model_parallel", layout.tp * layout.pp, "collective"))
    for name, size in (("tp", layout.tp), ("dp", layout.zero_dp)):
        if size > 1:   # a group of its own even when it spans the world (Megatron, DeepSpeed)
            out.append((name, size, "collective"))
    if layout.ulysses > 1:
        out.append(("ulysses", layout.ulysses, "all_to_all"))
    if layout.pp > 1:
        ring = layout.interleave > 1 and layout.pp > 2   # interleaved: the last rank feeds the first
        out += [("pp", 2, "pair")] * (2 if ring else (stage > 0) + (stage < layout.pp - 1))
        if tied and stage in (0, layout.pp - 1):
            out.append(("embedding", 2, "collective"))
    if layout.cp > 1:
        out += [("cp", 2, "pair")] * (2 if layout.cp > 2 else 1)
    return out


def nccl_bytes(layout: Layout, stage: int, tied: bool) -> float:
    total = 0.0
    for _, size, kind in communicators(layout, stage, tied):
        if kind == "all_to_all":
            total += (size - 1) * NCCL_ALL_TO_ALL_PEER_BYTES
        else:
            total += NCCL_PAIR_BYTES if size == 2 else NCCL_COMM_BYTES
    return total


def attention_workspace_bytes(model: SpecLike, layout: Layout, seq: int, impl: ActivationImpl) -> float:
    """Eager attention: the scores and, in backward, their gradient, for this rank's heads."""
    if impl.attention != "eager":
        return 0.0
    spec = as_spec(model)
    heads = spec.n_heads / (layout.tp * layout.ulysses)
    queries = seq * layout.mbs / layout.cp
    p = 4 if impl.softmax_fp32 else layout.dtype_bytes
    return 2.0 * heads * queries * seq * p


def overhead_bytes(model: SpecLike, layout: Layout, seq: int, hw: HardwareProfile, mem: MemoryBreakdown,
                   impl: ActivationImpl = ActivationImpl(), fragmentation: float = FRAGMENTATION) -> Dict[str, float]:
    """The bytes above the counted tensors on one rank of ``mem.stage`` (all zero on a measured
    profile)."""
    if hw.measured:
        return {}
    spec = as_spec(model)
    attention = attention_workspace_bytes(spec, layout, seq, impl)
    return {"cublas_workspace": cublas_workspace_bytes(hw),
            "nccl_buffers": nccl_bytes(layout, mem.stage, spec.tied_embeddings),
            "attention_workspace": attention,
            "allocator": fragmentation * (mem.activations + attention)}


@dataclass
class MemoryVerdict:
    """Does one rank fit: everything it needs against what its allocator can have."""

    needed_bytes: float
    usable_bytes: float
    overheads: Dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.usable_bytes

    @property
    def margin_bytes(self) -> float:
        """Free bytes when it fits; negative: the shortfall."""
        return self.usable_bytes - self.needed_bytes

    def describe(self) -> str:
        if self.fits:
            return (f"fits: {self.needed_bytes / GiB:.1f} of {self.usable_bytes / GiB:.1f} GiB usable, "
                    f"margin {self.margin_bytes / GiB:.1f} GiB")
        return (f"does not fit: needs {self.needed_bytes / GiB:.1f} GiB of {self.usable_bytes / GiB:.1f} usable, "
                f"{-self.margin_bytes / GiB:.1f} over")

    def as_dict(self) -> Dict[str, object]:
        return {"fits": self.fits, "needed_bytes": self.needed_bytes, "usable_bytes": self.usable_bytes,
                "margin_bytes": self.margin_bytes, "overhead_bytes": dict(self.overheads),
                "verdict": self.describe()}


def verdict(model: SpecLike, layout: Layout, seq: int, hw: HardwareProfile, mem: MemoryBreakdown,
            impl: ActivationImpl = ActivationImpl(), fragmentation: Optional[float] = None) -> MemoryVerdict:
    """``mem`` (the counted tensors) plus the overheads against the usable capacity."""
    over = overhead_bytes(model, layout, seq, hw, mem, impl,
                          FRAGMENTATION if fragmentation is None else fragmentation)
    return MemoryVerdict(needed_bytes=mem.total + sum(over.values()),
                         usable_bytes=usable_bytes(hw), overheads=over)
