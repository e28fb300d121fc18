"""Hardware profiles: peak FLOP/s, memory, bandwidths. GPUs from the makers' datasheets (YAML in
``megallama/configs/hardware``, sources in their comments), any other machine from a profile file
of the same schema (``--gpu FILE.yaml``, documented in ``examples/gpu-custom.yaml``); ``cpu``
measured on this machine.

Bandwidths are bytes/s *per GPU per direction*: the intra-node link (NVLink, xGMI, or PCIe where
the GPUs have nothing better), the node's NICs between nodes, PCIe to the host. Peaks are dense (no
2:4 sparsity), the denominator of MFU/HFU.
"""
from __future__ import annotations

import difflib
import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from megallama.errors import UserError

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "configs" / "hardware"
EXAMPLE = "examples/gpu-custom.yaml"
PEAK_DTYPES = ("fp8", "bf16", "fp16", "tf32", "fp32")


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
    nics_per_node: int = 0
    nic_bandwidth: float = 0.0
    device_names: Tuple[str, ...] = field(default_factory=tuple)
    # the share of inter_node_bandwidth this cluster's rings between nodes reach, as measured there
    # (commands/network.py); None: the nominal bandwidth (efficiency.cross_node_fraction)
    cross_node_share: Optional[float] = None

    def peak(self, dtype: str = "bf16") -> float:
        """Dense peak for a compute dtype (fp32 training on GPUs runs on TF32 tensor cores only
        when enabled; we take plain FP32 for ``fp32``)."""
        if dtype not in self.peak_flops:
            raise UserError(f"hardware {self.name}: no peak FLOP/s for dtype '{dtype}'")
        return self.peak_flops[dtype]


# ------------------------------------------------------------------------------ profile files
# key -> (kind, required, what a value must be). One table for the shipped profiles and custom files.
SCHEMA: Dict[str, Tuple[str, bool, str]] = {
    "name": ("text", False, "a profile name (default: the file's name)"),
    "description": ("text", False, "one line of text"),
    "aliases": ("names", False, "a list of other names for the profile"),
    "device_names": ("names", False, "a list of exact device names the driver reports"),
    "peak_flops": ("peaks", True, f"a mapping of dtype ({', '.join(PEAK_DTYPES)}; bf16 required) to dense FLOP/s"),
    "memory_bytes": ("number", True, "a positive number (bytes of device memory)"),
    "memory_bandwidth": ("number", True, "a positive number (device memory bytes/s)"),
    "intra_node_bandwidth": ("number", True, "a positive number (bytes/s per GPU per direction inside a node)"),
    "inter_node_bandwidth": ("number", False, "a positive number (bytes/s per GPU per direction between nodes)"),
    "nics_per_node": ("count", False, "a positive integer (network adapters per node)"),
    "nic_bandwidth": ("number", False, "a positive number (bytes/s per NIC per direction)"),
    "host_bandwidth": ("number", True, "a positive number (bytes/s per GPU per direction to the host)"),
    "intra_node_latency_s": ("number", False, "a positive number (seconds per hop inside a node)"),
    "inter_node_latency_s": ("number", False, "a positive number (seconds per hop between nodes)"),
    "gpus_per_node": ("count", True, "a positive integer"),
    "cross_node_share": ("share", False, "a number above 0 and at most 1 (the share of the inter-node bandwidth "
                                         "this cluster's rings between nodes reach, as measured)"),
}


def _number(value: Any) -> float:
    """A positive finite number, or NaN. YAML 1.1 reads ``3.35e12`` (no dot before the exponent's
    sign) as a string, so numeric strings count as numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return math.nan
    try:
        out = float(value)
    except ValueError:
        return math.nan
    return out if math.isfinite(out) and out > 0 else math.nan


def _value(origin: str, key: str, kind: str, what: str, value: Any) -> Any:
    def bad() -> UserError:
        return UserError(f"GPU profile {origin}: '{key}': expected {what}, got {value!r}")

    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise bad()
        return value.strip()
    if kind == "names":
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise bad()
        return tuple(v.strip() for v in value)
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad()
        return value
    if kind in ("number", "share"):
        out = _number(value)
        if math.isnan(out) or (kind == "share" and out > 1):
            raise bad()
        return out
    if not isinstance(value, dict):   # peaks
        raise bad()
    peaks = {}
    for dtype, flops in value.items():
        if dtype not in PEAK_DTYPES:
            raise UserError(f"GPU profile {origin}: 'peak_flops': unknown dtype {dtype!r}{_hint(dtype, PEAK_DTYPES)} "
                            f"(expected some of {', '.join(PEAK_DTYPES)})")
        peaks[dtype] = _value(origin, f"peak_flops.{dtype}", "number", "a positive number (dense FLOP/s)", flops)
    if "bf16" not in peaks:
        raise UserError(f"GPU profile {origin}: 'peak_flops.bf16': missing (expected the dense bf16 FLOP/s)")
    return peaks


def _hint(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def profile_from_dict(data: Any, origin: str, default_name: str) -> HardwareProfile:
    """A validated profile; every fault is one line naming ``origin``, the field and what it expects.
    ``inter_node_bandwidth``, when not given, is the GPU's share of the node's NICs."""
    if not isinstance(data, dict):
        raise UserError(f"GPU profile {origin}: expected a mapping of profile fields (see {EXAMPLE}), "
                        f"got {type(data).__name__}")
    for key in data:
        if key not in SCHEMA:
            raise UserError(f"GPU profile {origin}: unknown field {key!r}{_hint(key, SCHEMA)} (see {EXAMPLE})")
    missing = [k for k, (_, required, _) in SCHEMA.items() if required and k not in data]
    if missing:
        raise UserError(f"GPU profile {origin}: missing {', '.join(repr(k) for k in missing)} (see {EXAMPLE})")
    out = {k: _value(origin, k, SCHEMA[k][0], SCHEMA[k][2], v) for k, v in data.items()}
    nics = [k for k in ("nics_per_node", "nic_bandwidth") if k in out]
    if len(nics) == 1:
        other = "nic_bandwidth" if nics == ["nics_per_node"] else "nics_per_node"
        raise UserError(f"GPU profile {origin}: {other!r}: missing (expected {SCHEMA[other][2]}, with {nics[0]!r})")
    if "inter_node_bandwidth" not in out:
        if not nics:
            raise UserError(f"GPU profile {origin}: missing 'nics_per_node' and 'nic_bandwidth' "
                            f"(or 'inter_node_bandwidth', bytes/s per GPU per direction)")
        out["inter_node_bandwidth"] = out["nics_per_node"] * out["nic_bandwidth"] / out["gpus_per_node"]
    out.setdefault("name", default_name)
    out.setdefault("description", out["name"])
    return HardwareProfile(**out)


def load_profile_file(path: Path) -> HardwareProfile:
    """A profile YAML, read with ``yaml.safe_load`` (no code runs)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"GPU profile {path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"GPU profile {path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"GPU profile {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"GPU profile {path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    return profile_from_dict(data, str(path), path.stem)


def _is_file(name: str) -> bool:
    return name.lower().endswith((".yaml", ".yml")) or os.sep in name or bool(os.altsep and os.altsep in name)


@lru_cache(maxsize=None)
def shipped_profiles() -> Dict[str, HardwareProfile]:
    """The profiles under ``configs/hardware``, by name (each file's stem)."""
    return {p.stem: load_profile_file(p) for p in sorted(HARDWARE_DIR.glob("*.yaml"))}


def hardware_names() -> List[str]:
    return sorted(list(shipped_profiles()) + ["cpu"])


def _aliases() -> Dict[str, str]:
    return {a.lower(): name for name, hw in shipped_profiles().items() for a in hw.aliases}


def load_hardware(name: str) -> HardwareProfile:
    """A profile by name or alias (``h100`` -> ``h100-sxm``), or from a profile file (``*.yaml`` or
    a path); ``cpu`` is measured in-process."""
    if _is_file(name):
        return load_profile_file(Path(name))
    key = name.lower()
    if key == "cpu":
        return cpu_profile()
    profiles = shipped_profiles()
    key = _aliases().get(key, key)
    if key not in profiles:
        choices = hardware_names() + sorted(_aliases())
        close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown GPU type '{name}'{hint} (available: {', '.join(hardware_names())}, "
                        f"or a profile file such as {EXAMPLE})")
    return replace(profiles[key], peak_flops=dict(profiles[key].peak_flops))   # the cached one stays as read


def profile_source(name: str) -> Optional[Path]:
    """The YAML file ``load_hardware(name)`` reads (None: ``cpu``, measured in-process)."""
    if _is_file(name):
        return Path(name)
    if name.lower() == "cpu":
        return None
    return HARDWARE_DIR / f"{load_hardware(name).name}.yaml"


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
                           gpus_per_node=os.cpu_count() or 1, measured=True, nics_per_node=1, nic_bandwidth=1.25e9)
