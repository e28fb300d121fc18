"""Hardware profiles: peak FLOP/s, memory, bandwidths. GPUs from the makers' datasheets (YAML in
``megallama/configs/hardware``, sources in their comments); ``cpu`` measured on this machine.

Bandwidths are bytes/s *per GPU per direction*: NVLink inside a node, the GPU's InfiniBand NIC
between nodes, PCIe to the host. Peaks are dense (no 2:4 sparsity), the denominator of MFU/HFU.
"""
from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

from megallama.errors import UserError

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "configs" / "hardware"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    peak_flops: Dict[str, float]
    memory_bytes: float
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    host_bandwidth: float
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 10e-6
    gpus_per_node: int = 8
    aliases: Tuple[str, ...] = field(default_factory=tuple)
    measured: bool = False

    def peak(self, dtype: str = "bf16") -> float:
        """Dense peak for a compute dtype (fp32 training on GPUs runs on TF32 tensor cores only
        when enabled; we take plain FP32 for ``fp32``)."""
        if dtype not in self.peak_flops:
            raise UserError(f"hardware {self.name}: no peak FLOP/s for dtype '{dtype}'")
        return self.peak_flops[dtype]


def _profiles() -> Dict[str, Path]:
    return {p.stem: p for p in sorted(HARDWARE_DIR.glob("*.yaml"))}


def hardware_names() -> List[str]:
    return sorted(list(_profiles()) + ["cpu"])


def _aliases() -> Dict[str, str]:
    out: Dict[str, str] = {}
    for name, path in _profiles().items():
        for alias in (yaml.safe_load(path.read_text()) or {}).get("aliases", []):
            out[str(alias).lower()] = name
    return out


def load_hardware(name: str) -> HardwareProfile:
    """A profile by name or alias (``h100`` -> ``h100-sxm``); ``cpu`` is measured in-process."""
    key = name.lower()
    if key == "cpu":
        return cpu_profile()
    profiles = _profiles()
    key = _aliases().get(key, key)
    if key not in profiles:
        choices = hardware_names() + sorted(_aliases())
        close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown GPU type '{name}'{hint} (available: {', '.join(hardware_names())})")
    data = yaml.safe_load(profiles[key].read_text())
    data["aliases"] = tuple(data.get("aliases", []))
    data["peak_flops"] = {k: float(v) for k, v in data["peak_flops"].items()}
    for key in ("memory_bytes", "memory_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth",
                "host_bandwidth", "intra_node_latency_s", "inter_node_latency_s"):
        if key in data:
            data[key] = float(data[key])    # YAML reads 3.35e12 (no sign in the exponent) as a string
    return HardwareProfile(**data)


# ------------------------------------------------------------------------------------- CPU
@lru_cache(maxsize=None)
def measure_cpu_gemm_peak(dtype: str = "fp32", budget_s: float = 0.5) -> float:
    """FLOP/s of a large square GEMM on this CPU (best of a few timed runs, about ``budget_s``).

    Cached per process: the trainer's MFU line and ``plan --gpu cpu`` reuse one measurement.
    """
    import torch

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    n = 1024
    a = torch.randn(n, n).to(tdtype)
    b = torch.randn(n, n).to(tdtype)
    torch.mm(a, b)                                  # warm-up (and one-time kernel selection)
    best, spent, flops = float("inf"), 0.0, 2.0 * n ** 3
    while spent < budget_s:
        start = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - start
        spent += dt
        best = min(best, dt)
        if best > budget_s / 3:                     # very slow dtype (no native bf16): stop early
            break
    return flops / best


@lru_cache(maxsize=None)
def measure_cpu_memory_bandwidth(budget_s: float = 0.2) -> float:
    """Bytes/s of a large tensor copy (read + write), best of a few runs."""
    import torch

    src = torch.empty(32 * 2 ** 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)                                  # untimed: the first copy faults every page of dst in
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        start = time.perf_counter()
        dst.copy_(src)
        dt = time.perf_counter() - start
        spent, best = spent + dt, min(best, dt)
    return 2 * src.numel() * 4 / best


@lru_cache(maxsize=None)
def cpu_profile() -> HardwareProfile:
    """This machine, its GEMM peaks and copy bandwidth measured now (fp16 is taken as the bf16 figure)."""
    peaks = {"fp32": measure_cpu_gemm_peak("fp32"), "bf16": measure_cpu_gemm_peak("bf16")}
    return cpu_profile_of({**peaks, "fp16": peaks["bf16"]}, measure_cpu_memory_bandwidth())


def cpu_profile_of(peaks: Dict[str, float], bandwidth: float) -> HardwareProfile:
    """This machine as one node of ``cpu_count`` 'GPUs' with the given GEMM peaks and copy bandwidth
    (the trainer passes its cached peak: measuring every dtype afresh costs each start seconds);
    collectives run over gloo in shared memory, taken as half the copy bandwidth; 'inter-node' is
    an assumed 10 Gb/s Ethernet."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HardwareProfile(name="cpu", description=f"this CPU ({os.cpu_count()} cores, measured)",
                           peak_flops=dict(peaks), memory_bytes=float(mem), memory_bandwidth=bandwidth,
                           intra_node_bandwidth=bandwidth / 2, inter_node_bandwidth=1.25e9, host_bandwidth=bandwidth,
                           intra_node_latency_s=20e-6, inter_node_latency_s=50e-6,
                           gpus_per_node=os.cpu_count() or 1, measured=True)
