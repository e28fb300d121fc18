"""Device detection by exact name (no GPU here: names are fed in, NVML and CUDA are faked): each
shipped GPU's reported name maps to its own profile, an H100 PCIe is not an SXM, a MIG slice or an
unknown device is named and gets no profile, and the trainer's peak comes from the detected one."""
import sys
import types

import pytest

from megallama.profiling import detect
from megallama.profiling.detect import Device, match
from megallama.profiling.hardware import load_hardware
from megallama.train import metrics

MiB = 2 ** 20

# (exact name the driver reports, nvidia-smi / rocm-smi memory total) -> profile; sources in the YAMLs
REPORTED = [
    ("NVIDIA H100 80GB HBM3", 81559 * MiB, "h100-sxm"),
    ("NVIDIA H100 PCIe", 81559 * MiB, "h100-pcie"),
    ("NVIDIA H100 NVL", 95830 * MiB, "h100-nvl"),
    ("NVIDIA H200", 143771 * MiB, "h200"),
    ("NVIDIA B200", 183359 * MiB, "b200"),
    ("NVIDIA A100-SXM4-40GB", 40960 * MiB, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 81920 * MiB, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", 81920 * MiB, "a100-80gb-pcie"),
    ("NVIDIA A100-PCIE-40GB", 40960 * MiB, "a100-40gb-pcie"),
    ("AMD Instinct MI300X", 205822885888, "mi300x"),
    ("AMD Instinct MI300X VF", 205822885888, "mi300x"),
    ("NVIDIA L40S", 46068 * MiB, "l40s"),
]


@pytest.mark.parametrize("name, memory, profile", REPORTED)
def test_each_reported_name_maps_to_its_profile(name, memory, profile):
    found = match(Device(name, memory, "NVML"))
    assert found.profile == profile and profile in found.reason and name in found.reason
    # CUDA's totalGlobalMem is ~1% under NVML's total: still the same device
    assert match(Device(name, int(memory * 0.985), "torch")).profile == profile


def test_h100_pcie_is_not_sxm():
    pcie = match(Device("NVIDIA H100 PCIe", 81559 * MiB, "NVML"))
    assert pcie.profile == "h100-pcie"
    assert load_hardware(pcie.profile).peak("bf16") < 0.8 * load_hardware("h100-sxm").peak("bf16")


@pytest.mark.parametrize("name, memory", [
    ("NVIDIA H200 NVL", 143771 * MiB), ("NVIDIA H800", 81559 * MiB), ("NVIDIA GH200 480GB", 97871 * MiB),
    ("nvidia h100 pcie", 81559 * MiB), ("NVIDIA GeForce RTX 4090", 24564 * MiB), ("H100", 81559 * MiB),
])
def test_unknown_device_is_named_not_assumed(name, memory):
    found = match(Device(name, memory, "torch"))
    assert found.profile is None
    assert f"device '{name}'" in found.reason and "no hardware profile lists this name" in found.reason


def test_nearest_known_name_is_said_not_taken():
    found = match(Device("NVIDIA H200 NVL", 143771 * MiB, "NVML"))
    assert found.profile is None and "nearest known name, 'NVIDIA H100 NVL' (h100-nvl), is not assumed" in found.reason


def test_mig_slice_gets_no_profile():
    """A MIG 1g.10gb slice of an H100 reports the parent's name with a tenth of the memory (and of
    the SMs): the H100's peak would overstate it sevenfold."""
    found = match(Device("NVIDIA H100 80GB HBM3", 9984 * MiB, "torch"))
    assert found.profile is None and "named as h100-sxm" in found.reason and "MIG" in found.reason


class _FakeProps:
    def __init__(self, total, uuid="8a2f0c1e-0000-1111-2222-333344445555"):
        self.total_memory, self.uuid = total, uuid


def _fake_cuda(monkeypatch, name, total, uuid="8a2f0c1e-0000-1111-2222-333344445555"):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: _FakeProps(total, uuid))


def _fake_nvml(monkeypatch, name, total, as_bytes=False, fail_init=False):
    calls = []

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    nvml = types.SimpleNamespace(
        nvmlInit=init, nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=lambda uuid: calls.append(uuid) or "handle",
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(i) or "handle",
        nvmlDeviceGetName=lambda h: name.encode() if as_bytes else name,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=total))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return calls


def test_query_prefers_nvml_by_uuid(monkeypatch):
    _fake_cuda(monkeypatch, "torch's name", 80 * 2 ** 30)
    calls = _fake_nvml(monkeypatch, "NVIDIA H100 PCIe", 81559 * MiB, as_bytes=True)
    found = detect.detect()
    assert found.device == Device("NVIDIA H100 PCIe", 81559 * MiB, "NVML") and found.profile == "h100-pcie"
    assert calls == ["GPU-8a2f0c1e-0000-1111-2222-333344445555", "shutdown"]


@pytest.mark.parametrize("nvml", ["missing", "fails"])
def test_query_falls_back_to_torch(monkeypatch, nvml):
    _fake_cuda(monkeypatch, "NVIDIA H100 NVL", 94 * 2 ** 30)
    if nvml == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)      # import raises ImportError
    else:
        _fake_nvml(monkeypatch, "unused", 0, fail_init=True)
    found = detect.detect()
    assert found.device.via == "torch" and found.profile == "h100-nvl"


def test_no_accelerator_is_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect.detect() is None


def test_trainer_peak_uses_the_detected_profile(monkeypatch):
    monkeypatch.setattr(detect, "query_device", lambda index=None: Device("NVIDIA H100 PCIe", 81559 * MiB, "NVML"))
    peak, source = metrics.device_peak_flops("bf16")
    assert (peak, source) == (756.5e12, "h100-pcie")
    monkeypatch.setattr(detect, "query_device", lambda index=None: Device("NVIDIA A100-SXM4-80GB", 81920 * MiB, "NVML"))
    assert metrics.device_peak_flops("bf16") == (312e12, "a100-80gb")


def test_trainer_peak_on_unknown_device_is_nan_and_named(monkeypatch, caplog):
    monkeypatch.setattr(detect, "query_device", lambda index=None: Device("NVIDIA H800", 81559 * MiB, "NVML"))
    peak, source = metrics.device_peak_flops("bf16")
    assert peak != peak and "device 'NVIDIA H800'" in source           # NaN: no SXM figure assumed
    assert any("NVIDIA H800" in r.getMessage() for r in caplog.records)
