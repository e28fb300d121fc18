"""Refuse a model or batch that cannot fit this machine's memory, before allocating any of it.

Without this check ``train.micro_batch_size: 1000000000`` allocates for a minute and dies in a
traceback, and ``model.dim: 1048576`` dies inside the allocator. The prediction is the analytic
memory model of :mod:`megallama.profiling.memory` (checked storage by storage against DeepSpeed);
the capacity is the accelerator's memory, or on CPU the RAM available now, which this node's
ranks share. Only a prediction above the capacity is refused: the model is close but not
exact, so a near miss is left to run (and to the allocator). On a GPU the training check is the
verdict ``plan`` and ``estimate`` give (:func:`megallama.train.prediction.run_verdict`): a layout
they call "does not fit" is not started.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Tuple

import torch

from megallama.errors import UserError

LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                   "SLURM_NTASKS_PER_NODE")   # torchrun, deepspeed, Open MPI, MPICH, SLURM


def fmt_bytes(n: float) -> str:
    for unit, size in (("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def ranks_on_this_node(world_size: int) -> int:
    """Ranks sharing this machine's RAM, as the launcher tells it; else all of them (one node)."""
    for var in LOCAL_SIZE_VARS:
        digits = "".join(c for c in os.environ.get(var, "").split("(")[0] if c.isdigit())
        if digits and int(digits) > 0:
            return min(int(digits), world_size)
    return world_size


def available_ram() -> float:
    """MemAvailable (what can be allocated without swapping), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def capacity(world_size: int, local_rank: int = 0) -> Tuple[float, str]:
    """(bytes one rank may use, where they come from) on the device this rank will run on."""
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        total = float(torch.cuda.get_device_properties(index).total_memory)
        return total, f"cuda:{index} has {fmt_bytes(total)}"
    ranks = ranks_on_this_node(world_size)
    ram = available_ram()
    return ram / ranks, f"this machine has {fmt_bytes(ram)} of RAM available" + (
        f" for {ranks} ranks" if ranks > 1 else "")


def local_gpu(index: int):
    """GPU ``index`` as the memory verdict costs it: its shipped profile where one lists the exact
    device name (the cuBLAS workspace follows the generation), with the memory the device reports;
    a device no profile lists by its own name (taken as pre-Hopper) and memory, since only the
    name and the memory enter the verdict."""
    from megallama.profiling.detect import detect
    from megallama.profiling.hardware import HardwareProfile, load_hardware

    total = float(torch.cuda.get_device_properties(index).total_memory)
    found = detect(index)
    if found is not None and found.profile is not None:
        return dataclasses.replace(load_hardware(found.profile), memory_bytes=total)
    name = found.device.name if found is not None else torch.cuda.get_device_name(index)
    return HardwareProfile(name=name, description="no profile: its memory only, for the fit verdict",
                           peak_flops={}, memory_bytes=total, memory_bandwidth=0.0, intra_node_bandwidth=0.0,
                           inter_node_bandwidth=0.0, host_bandwidth=0.0)


def device_capacity(world_size: int, local_rank: int = 0, hardware: Any = None) -> Tuple[Any, float, str]:
    """(the GPU profile a verdict costs or None on CPU, bytes one rank may use, where they come from):
    ``hardware``, else this rank's GPU, its memory less the CUDA context; on CPU the RAM available
    now over this node's ranks (:func:`capacity`)."""
    from megallama.profiling.overheads import cuda_context_bytes, usable_bytes

    if hardware is None and torch.cuda.is_available():
        hardware = local_gpu(local_rank % torch.cuda.device_count())
    if hardware is None:
        return (None, *capacity(world_size, local_rank))
    usable = usable_bytes(hardware)
    less = f" ({fmt_bytes(hardware.memory_bytes)} less the CUDA context)" if cuda_context_bytes(hardware) else ""
    return hardware, usable, f"{hardware.name} has {fmt_bytes(usable)} usable{less}"


def _refuse(blame: str, what: str, need: float, parts: str, where: str, advice: str) -> None:
    raise UserError(f"{blame}: {what} would need about {fmt_bytes(need)} per rank ({need:,.0f} bytes predicted: "
                    f"{parts}) but {where}; {advice}")


def check_training_fits(cfg: Any, world_size: int, local_rank: int = 0) -> float:
    """``train``/``profile`` start-up: the worst pipeline stage's peak (model states, activations,
    buffers; on a GPU with its overheads) against this rank's share of the device; returns the
    counted tensors' peak (bytes per rank), which the run's records set beside the measured peak."""
    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.memory import params_per_rank
    from megallama.train.prediction import run_layout, run_verdict

    p, t, m = cfg.parallel, cfg.train, cfg.model
    layout, ds = run_layout(cfg, world_size)
    gpu, cap, where = device_capacity(world_size, local_rank)
    spec = ArchSpec.from_model_config(m)
    floor = params_per_rank(spec, p.tp, p.pp) * layout.dtype_bytes / layout.zero_dp   # weights, fully sharded
    if floor > cap:   # refused before the per-layer walk of ZeRO-3's model (a million layers is slow)
        _refuse("model", f"dim={m.dim}, n_layers={m.n_layers}, vocab_size={m.vocab_size}", floor,
                "the weights alone", where, "use a smaller model or shard it (parallel.tp, parallel.pp, more ranks)")
    mem, fit = run_verdict(cfg, layout, ds, gpu, cap)
    over = sum(fit.overheads.values())
    need = fit.needed_bytes
    if fit.fits:
        return need - over
    acts, states = mem.activations, need - mem.activations - over
    parts = (f"activations {fmt_bytes(acts)}, model states and buffers {fmt_bytes(states)}"
             + (f", device overheads {fmt_bytes(over)}" if over else ""))
    if acts > states:   # the larger of the two the config sets decides the advice
        _refuse("train.micro_batch_size", f"{t.micro_batch_size} sequences of {t.seq_len} tokens", need, parts, where,
                "lower train.micro_batch_size or train.seq_len, or set train.activation_checkpointing.mode")
    _refuse("model", f"dim={m.dim}, n_layers={m.n_layers}, vocab_size={m.vocab_size}", need, parts, where,
            "use a smaller model or shard it (parallel.tp, parallel.pp, ZeRO stage 3)")


def check_inference_fits(cfg: Any, tp: int, batch: int, seq: int, dtype: Optional[torch.dtype],
                         world_size: int, local_rank: int = 0, kv_cache: bool = False,
                         batch_flag: str = "--micro-batch-size", hardware: Any = None) -> None:
    """``eval``/``generate`` before building the model: this rank's weights in ``dtype``, one
    forward of ``batch`` x ``seq`` tokens (a block's tensors and fp32 logits, no autograd),
    and with ``kv_cache`` the preallocated keys and values. On a GPU (``hardware``, else this
    rank's) the device's overheads are added and its CUDA context taken off, as the training
    verdict does (:func:`megallama.profiling.overheads.verdict`)."""
    from megallama.profiling import activations as act
    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.layout import Layout
    from megallama.profiling.memory import MemoryBreakdown, params_per_rank
    from megallama.profiling.overheads import overhead_bytes

    spec = ArchSpec.from_model_config(cfg)
    seq = max(1, min(seq, cfg.max_seq_len))
    w = torch.empty((), dtype=dtype or torch.float32).element_size()
    weights = params_per_rank(spec, tp, 1) * w
    impl = act.ActivationImpl.for_device("cuda" if hardware is not None or torch.cuda.is_available() else "cpu")
    block = act.activation_bytes_per_layer(spec, seq, batch, tp, False, "none", w, impl)
    logits = 2 * batch * seq * cfg.vocab_size / tp * 4   # the logits and their fp32 log-softmax
    cache = 2 * cfg.n_layers * batch * seq * spec.kv_dim / tp * w if kv_cache else 0.0
    need = weights + block + logits + cache
    gpu, cap, where = device_capacity(world_size, local_rank, hardware)
    over = {} if gpu is None else overhead_bytes(
        spec, Layout(tp=tp, dp=1, mbs=batch, grad_accum=1), seq, gpu,
        MemoryBreakdown(stage=0, components={"activations.forward": block + logits}), impl)
    need += sum(over.values())
    if need <= cap:
        return need
    parts = (f"weights {fmt_bytes(weights)}, forward {fmt_bytes(block + logits)}"
             + (f", KV cache {fmt_bytes(cache)}" if kv_cache else "")
             + "".join(f", {k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in over.items() if v))
    if weights >= need / 2:
        _refuse("model", f"dim={cfg.dim}, n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size}", need, parts, where,
                "use more tensor-parallel ranks or a smaller dtype")
    _refuse(batch_flag, f"{batch} sequences of {seq} tokens", need, parts, where, "use fewer or shorter sequences")
