"""Which shipped hardware profile the device this process runs on is, by the exact name its driver
reports (NVML's ``nvmlDeviceGetName`` when ``pynvml`` is importable, else CUDA's/HIP's device name
through torch) and its memory size.

Why exact: an "H100" substring is an H100 PCIe (756 dense bf16 TFLOP/s, 2 TB/s) as much as an SXM
(989, 3.35 TB/s); costing or reporting one as the other is off by a third. A name no profile lists
is reported by that name, with no profile assumed. The names live in each profile's
``device_names`` (``megallama/configs/hardware/*.yaml``, sources in their comments).
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

from megallama.profiling.hardware import shipped_profiles

log = logging.getLogger(__name__)

GiB = 2 ** 30
# NVML's total and CUDA's totalGlobalMem differ by ~1%; a MIG slice or another memory variant of the
# same name is far outside this band
MEMORY_BAND = (0.9, 1.1)


@dataclass(frozen=True)
class Device:
    name: str              # exactly as the driver reports it
    memory_bytes: int
    via: str               # "NVML" or "torch"


@dataclass(frozen=True)
class Detection:
    device: Device
    profile: Optional[str]  # a shipped profile's name, or None
    reason: str             # one line: which profile and why, or why none


def known_names() -> Dict[str, str]:
    """Exact device name -> shipped profile."""
    return {dev: name for name, hw in shipped_profiles().items() for dev in hw.device_names}


def match(device: Device) -> Detection:
    """The profile listing this exact name, if the memory size agrees with it."""
    names = known_names()
    what = f"device '{device.name}' ({device.memory_bytes / GiB:.1f} GiB, from {device.via})"
    key = names.get(device.name.strip())
    if key is None:
        close = difflib.get_close_matches(device.name, list(names), n=1, cutoff=0.6)
        near = f"; the nearest known name, '{close[0]}' ({names[close[0]]}), is not assumed" if close else ""
        return Detection(device, None, f"{what}: no hardware profile lists this name{near}; MFU and predictions "
                                       f"need a profile (see examples/gpu-custom.yaml)")
    expected = shipped_profiles()[key].memory_bytes
    lo, hi = MEMORY_BAND
    if not lo * expected <= device.memory_bytes <= hi * expected:
        return Detection(device, None, f"{what}: named as {key}, whose memory is {expected / GiB:.1f} GiB; "
                                       f"a MIG slice or another variant, so no profile is assumed")
    return Detection(device, key, f"{what} -> hardware profile {key}")


def _nvml_device(index: int) -> Optional[Device]:
    """The device through NVML, found by its UUID (NVML counts devices regardless of
    CUDA_VISIBLE_DEVICES); None where NVML is missing or fails (ROCm, no driver)."""
    try:
        import pynvml
    except ImportError:
        return None
    import torch

    try:
        pynvml.nvmlInit()
    except Exception as exc:   # NVMLError subclasses, or a stub library: fall back to torch
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid:
            uuid = str(uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid[:4] in ("GPU-", "MIG-") else f"GPU-{uuid}")
        elif not os.environ.get("CUDA_VISIBLE_DEVICES"):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        else:
            return None
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    except Exception as exc:
        log.debug("NVML query failed: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()
    name = name.decode() if isinstance(name, bytes) else str(name)   # older pynvml returns bytes
    return Device(name, int(total), "NVML")


def query_device(index: Optional[int] = None) -> Optional[Device]:
    """This process's accelerator (the current CUDA/HIP device), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else index
    found = _nvml_device(index)
    if found is not None:
        return found
    props = torch.cuda.get_device_properties(index)
    return Device(torch.cuda.get_device_name(index), int(props.total_memory), "torch")


def detect(index: Optional[int] = None) -> Optional[Detection]:
    device = query_device(index)
    return None if device is None else match(device)
