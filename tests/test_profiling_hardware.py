"""Hardware profiles: makers' figures load and agree with themselves, aliases resolve, unknown names
suggest, custom profile files work end to end and bad ones are refused in one line, CPU measures."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megallama.errors import UserError
from megallama.profiling.hardware import (PEAK_DTYPES, hardware_names, load_hardware, measure_cpu_gemm_peak,
                                          shipped_profiles)

GiB = 2 ** 30
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gpu-custom.yaml"


@pytest.mark.parametrize("name, bf16_tflops, mem_gib, hbm_tbs", [
    ("a100-40gb", 312, 40, 1.555), ("a100-80gb", 312, 80, 2.039), ("h100-sxm", 989.4, 79.6, 3.35),
    ("h200", 989.4, 140.4, 4.8), ("h100-pcie", 756.5, 79.6, 2.0), ("h100-nvl", 835.5, 93.6, 3.9),
    ("b200", 2250, 179.1, 8.0), ("mi300x", 1307.4, 191.7, 5.3), ("l40s", 362.05, 45.0, 0.864),
    ("a100-80gb-pcie", 312, 80, 1.935), ("a100-40gb-pcie", 312, 40, 1.555),
])
def test_gpu_profiles(name, bf16_tflops, mem_gib, hbm_tbs):
    hw = load_hardware(name)
    assert hw.peak("bf16") == pytest.approx(bf16_tflops * 1e12)
    assert hw.memory_bytes / GiB == pytest.approx(mem_gib, abs=0.1)
    assert hw.memory_bandwidth == pytest.approx(hbm_tbs * 1e12)
    assert hw.intra_node_bandwidth > hw.inter_node_bandwidth > 0 and hw.gpus_per_node == 8


@pytest.mark.parametrize("name", sorted(shipped_profiles()))
def test_every_shipped_profile_is_consistent(name):
    hw = load_hardware(name)
    p = hw.peak_flops
    assert set(p) <= set(PEAK_DTYPES) and {"bf16", "fp16", "tf32", "fp32"} <= set(p)
    assert all(v > 0 for v in p.values())
    assert p.get("fp8", p["bf16"]) >= p["bf16"] == p["fp16"] >= p["tf32"] >= p["fp32"]   # dense rates
    if "fp8" in p:
        assert p["fp8"] == pytest.approx(2 * p["bf16"], rel=0.02)    # twice BF16 (L40S datasheet: 733 vs 362.05)
    assert 10 * GiB < hw.memory_bytes < 300 * GiB and 0.5e12 < hw.memory_bandwidth < 10e12
    assert hw.inter_node_bandwidth == pytest.approx(hw.nics_per_node * hw.nic_bandwidth / hw.gpus_per_node)
    assert hw.memory_bandwidth > hw.intra_node_bandwidth >= hw.inter_node_bandwidth
    assert hw.host_bandwidth > 0 and 0 < hw.intra_node_latency_s < 1e-4 and 0 < hw.inter_node_latency_s < 1e-4
    assert hw.device_names and hw.name == name and hw.description


def test_device_names_and_aliases_are_unique():
    profiles = shipped_profiles().values()
    names = [d for hw in profiles for d in hw.device_names]
    aliases = [a for hw in profiles for a in hw.aliases]
    assert len(set(names)) == len(names) and len(set(aliases)) == len(aliases)
    assert not set(aliases) & set(hardware_names())


def test_aliases_and_did_you_mean():
    assert load_hardware("H100").name == "h100-sxm"
    assert load_hardware("a100").name == "a100-40gb"
    assert load_hardware("h100-pcie").name == "h100-pcie"
    assert set(hardware_names()) >= {"a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h100-nvl", "h200", "b200",
                                      "mi300x", "l40s", "cpu"}
    with pytest.raises(UserError, match="did you mean 'h200'"):
        load_hardware("h20O")
    with pytest.raises(UserError, match="unknown GPU type"):
        load_hardware("tpu-v4")


def test_custom_profile_file(tmp_path):
    hw = load_hardware(str(EXAMPLE))
    assert hw.name == "h100-pcie-4gpu" and hw.gpus_per_node == 4 and hw.peak("fp8") == 1513.0e12
    assert hw.inter_node_bandwidth == pytest.approx(2 * 50e9 / 4)        # derived from the NICs
    data = yaml.safe_load(EXAMPLE.read_text())
    for key in ("name", "description", "nics_per_node", "nic_bandwidth"):
        del data[key]
    data["inter_node_bandwidth"] = "3.5e10"                                # YAML 1.1 reads this as a string
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(data))
    hw = load_hardware(str(tmp_path / "mine.yaml"))
    assert hw.name == "mine" and hw.inter_node_bandwidth == 3.5e10


def _bad(tmp_path, **change):
    data = yaml.safe_load(EXAMPLE.read_text())
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("change, needle", [
    ({"memory_byte": 1}, "unknown field 'memory_byte' (did you mean 'memory_bytes'?)"),
    ({"memory_bytes": None, "host_bandwidth": None}, "missing 'memory_bytes', 'host_bandwidth'"),
    ({"memory_bandwidth": -2.0e12}, "'memory_bandwidth': expected a positive number (device memory bytes/s), got -2"),
    ({"memory_bandwidth": 0}, "'memory_bandwidth': expected a positive number"),
    ({"memory_bandwidth": ".nan"}, "'memory_bandwidth': expected a positive number"),
    ({"gpus_per_node": 4.5}, "'gpus_per_node': expected a positive integer, got 4.5"),
    ({"gpus_per_node": True}, "'gpus_per_node': expected a positive integer, got True"),
    ({"intra_node_bandwidth": "fast"}, "'intra_node_bandwidth': expected a positive number"),
    ({"peak_flops": {"fp16": 1e12}}, "'peak_flops.bf16': missing"),
    ({"peak_flops": {"bf16": 1e12, "bf61": 1e12}}, "unknown dtype 'bf61' (did you mean 'bf16'?)"),
    ({"peak_flops": {"bf16": [1]}}, "'peak_flops.bf16': expected a positive number (dense FLOP/s), got [1]"),
    ({"peak_flops": 5}, "'peak_flops': expected a mapping"),
    ({"aliases": "x"}, "'aliases': expected a list"),
    ({"nic_bandwidth": None}, "'nic_bandwidth': missing (expected a positive number (bytes/s per NIC"),
    ({"nic_bandwidth": None, "nics_per_node": None}, "missing 'nics_per_node' and 'nic_bandwidth'"),
])
def test_bad_custom_profile_is_one_line(tmp_path, change, needle):
    path = _bad(tmp_path, **change)
    with pytest.raises(UserError) as err:
        load_hardware(path)
    message = str(err.value)
    assert needle in message and message.startswith(f"GPU profile {path}: ") and "\n" not in message


@pytest.mark.parametrize("text, needle", [
    (None, "no such file"), ("peak_flops: [1, 2\n", "not valid YAML at line 2"), ("- 1\n- 2\n", "got list"),
    (b"\xff\xfe", "not UTF-8 text"), ("!!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
])
def test_unreadable_profile_file_is_one_line(tmp_path, text, needle):
    path = tmp_path / "gpu.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=needle):
        load_hardware(str(path))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_plan_with_a_custom_profile_end_to_end(tmp_path):
    """``plan --gpu FILE.yaml`` costs the file's machine: its name and its node size; a worse link in
    the file gives a slower plan; a bad file is one line and exit 2."""
    good = _cli("plan", "--model", "llama-7b", "--gpus", "16", "--gpu", str(EXAMPLE), "--tp", "8", "--pp", "1",
                "--json")
    assert good.returncode == 0, good.stderr
    import json

    fast = json.loads(good.stdout)
    data = yaml.safe_load(EXAMPLE.read_text())
    data["intra_node_bandwidth"] = 8.0e9                       # tp8 spans 2 nodes of 4: slower
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(data))
    slow = json.loads(_cli("plan", "--model", "llama-7b", "--gpus", "16", "--gpu", str(tmp_path / "slow.yaml"),
                           "--tp", "8", "--pp", "1", "--json").stdout)
    assert json.dumps(fast).count("h100-pcie-4gpu") >= 1
    best = lambda r: r["candidates"][0]["tokens_per_s_per_gpu"]  # noqa: E731
    assert best(slow) < best(fast)
    bad = _cli("plan", "--model", "llama-7b", "--gpus", "16", "--gpu", _bad(tmp_path, gpus_per_node=0))
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert bad.returncode == 2 and len(lines) == 1 and "'gpus_per_node': expected a positive integer, got 0" in lines[0]


def test_cpu_gemm_peak_is_measured_once():
    start = time.perf_counter()
    first = measure_cpu_gemm_peak("fp32")
    took = time.perf_counter() - start
    assert 1e8 < first < 1e14 and took < 5
    start = time.perf_counter()
    assert measure_cpu_gemm_peak("fp32") == first          # cached in-process
    assert time.perf_counter() - start < 0.01


def test_a_measured_cross_node_share_is_the_clusters_own(tmp_path):
    """``cross_node_share`` in a profile scales the NICs for ZeRO-3 across nodes (what a cluster
    measured of itself; without it, their nominal bandwidth); out of (0, 1] it is one line naming
    the field."""
    from megallama.profiling.arch import as_spec
    from megallama.profiling.layout import Layout
    from megallama.profiling.steptime import predict

    data = yaml.safe_load(EXAMPLE.read_text())
    layout = Layout(dp=16, zero=3, mbs=1, grad_accum=1, recompute="full", gpus_per_node=4)   # 4 nodes
    step = {}
    for share in (None, 1.0, 0.3):
        if share is not None:
            data["cross_node_share"] = share
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
        hw = load_hardware(str(tmp_path / "c.yaml"))
        assert hw.cross_node_share == share
        step[share] = predict(as_spec("llama-13b"), layout, 2048, hw).time["dp_comm_exposed"]
    assert step[1.0] == step[None] < step[0.3]
    for bad in (0, 1.5, "fast"):
        with pytest.raises(UserError, match=r"'cross_node_share': expected a number above 0 and at most 1"):
            load_hardware(_bad(tmp_path, cross_node_share=bad))
