"""Hardware profiles: makers' figures load, aliases resolve, unknown names suggest, CPU measures."""
import time

import pytest

from megallama.errors import UserError
from megallama.profiling.hardware import hardware_names, load_hardware, measure_cpu_gemm_peak

GiB = 2 ** 30


@pytest.mark.parametrize("name, bf16_tflops, mem_gib, hbm_tbs", [
    ("a100-40gb", 312, 40, 1.555), ("a100-80gb", 312, 80, 2.039), ("h100-sxm", 989.4, 79.6, 3.35),
    ("h200", 989.4, 140.4, 4.8),
])
def test_gpu_profiles(name, bf16_tflops, mem_gib, hbm_tbs):
    hw = load_hardware(name)
    assert hw.peak("bf16") == pytest.approx(bf16_tflops * 1e12)
    assert hw.memory_bytes / GiB == pytest.approx(mem_gib, abs=0.1)
    assert hw.memory_bandwidth == pytest.approx(hbm_tbs * 1e12)
    assert hw.intra_node_bandwidth > hw.inter_node_bandwidth > 0 and hw.gpus_per_node == 8


def test_aliases_and_did_you_mean():
    assert load_hardware("H100").name == "h100-sxm"
    assert load_hardware("a100").name == "a100-40gb"
    assert set(hardware_names()) >= {"a100-40gb", "a100-80gb", "h100-sxm", "h200", "cpu"}
    with pytest.raises(UserError, match="did you mean 'h200'"):
        load_hardware("h20O")
    with pytest.raises(UserError, match="unknown GPU type"):
        load_hardware("tpu-v4")


def test_cpu_gemm_peak_is_measured_once():
    start = time.perf_counter()
    first = measure_cpu_gemm_peak("fp32")
    took = time.perf_counter() - start
    assert 1e8 < first < 1e14 and took < 5
    start = time.perf_counter()
    assert measure_cpu_gemm_peak("fp32") == first          # cached in-process
    assert time.perf_counter() - start < 0.01
