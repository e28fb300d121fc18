"""GEMM time depends on the shapes and the machine (megallama/profiling/efficiency.py): small
per-rank GEMMs run below the ceiling, more so on H100 (twice the A100's FLOP/byte balance); and
the step-time model actually uses that dependence."""
import dataclasses

import pytest

from megallama.profiling import efficiency as eff_mod
from megallama.profiling.efficiency import Gemm, achievable_bandwidth, gemm_seconds, intensity
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.steptime import Efficiency, predict

A100, H100 = load_hardware("a100-80gb"), load_hardware("h100-sxm")


def fraction(g: Gemm, hw, ceiling: float = Efficiency().gemm) -> float:
    """Achieved FLOP/s over the dense peak."""
    return g.flops / gemm_seconds(g, hw.peak("bf16"), hw.memory_bandwidth, 2, ceiling) / hw.peak("bf16")


def test_large_gemms_approach_the_ceiling_and_small_ones_fall_below():
    ceiling = Efficiency().gemm
    big, small = Gemm("mlp", 16384, 16384, 8192), Gemm("qkv/tp8", 2048, 384, 4096)
    for hw in (A100, H100):
        assert ceiling * 0.9 < fraction(big, hw) < ceiling
        assert fraction(small, hw) < 0.75 * fraction(big, hw)
    assert intensity(big) > 10 * intensity(small)


def test_monotone_in_every_dimension():
    for hw in (A100, H100):
        for dim in ("m", "n", "k"):
            fr = [fraction(dataclasses.replace(Gemm("g", 1024, 1024, 1024), **{dim: x}), hw)
                  for x in (128, 512, 2048, 8192, 32768)]
            assert fr == sorted(fr) and fr[0] < fr[-1]


def test_h100_is_less_efficient_than_a100_at_the_same_small_shape():
    small = Gemm("wo/tp8", 2048, 4096, 512)
    assert fraction(small, H100) < fraction(small, A100) - 0.05
    big = Gemm("mlp", 16384, 16384, 8192)
    assert fraction(big, H100) == pytest.approx(fraction(big, A100), abs=0.03)   # both near the ceiling


def test_small_messages_get_a_fraction_of_the_bus_bandwidth():
    link, bus = 450e9, 0.8
    assert achievable_bandwidth(link, 2 ** 30, bus) > 0.99 * bus * link
    assert achievable_bandwidth(link, eff_mod.MESSAGE_HALF, bus) == pytest.approx(0.5 * bus * link)
    assert achievable_bandwidth(link, 2 ** 16, bus) < 0.02 * bus * link


def test_per_generation_figures_and_their_defaults():
    """Flash attention's rate and the sustained clock are the only per-generation constants: an
    H200 takes its H100's, a generation without a fit the stated defaults, a measured CPU none."""
    assert eff_mod.attention_kernel_fraction(A100) > eff_mod.attention_kernel_fraction(H100)
    h200, cpu = load_hardware("h200"), dataclasses.replace(A100, name="cpu", measured=True)
    assert eff_mod.attention_kernel_fraction(h200) == eff_mod.ATTENTION_KERNEL["h100"]
    assert eff_mod.sustained_clock(h200) == eff_mod.SUSTAINED_CLOCK["h100"] < eff_mod.sustained_clock(A100) == 1.0
    other = dataclasses.replace(H100, name="b200")
    assert eff_mod.attention_kernel_fraction(other) == eff_mod.ATTENTION_KERNEL[eff_mod.ATTENTION_KERNEL_DEFAULT]
    assert eff_mod.sustained_clock(other) == 1.0 and eff_mod.sustained_clock(cpu) == 1.0


def _tp_compute_cost(hw) -> float:
    """Compute seconds of a 1B model's step at TP 8 (x 8 ranks) over TP 1's: 1 when TP splits the
    work perfectly."""
    c = {tp: predict("llama3.2-1b", Layout(tp=tp, dp=8 // tp, zero=1, mbs=1, grad_accum=8, sp=tp > 1), 2048,
                     hw).time["compute"] * tp for tp in (1, 8)}
    return c[8] / c[1]


def test_deep_tp_on_a_small_model_costs_compute_efficiency(monkeypatch):
    """The step model passes the per-rank shapes through: at TP 8 a 1B model's GEMMs have a few
    hundred columns per rank and run further below peak than at TP 1, more so on H100. Made
    shape-independent again (the old ``FLOPs / (peak * gemm)``), the extra cost disappears."""
    shaped = {hw.name: _tp_compute_cost(hw) for hw in (A100, H100)}
    with monkeypatch.context() as m:
        m.setattr(eff_mod, "gemm_seconds", lambda g, peak, bw, w, ceiling: g.flops / (peak * ceiling))
        flat = {hw.name: _tp_compute_cost(hw) for hw in (A100, H100)}
    extra = {k: shaped[k] - flat[k] for k in shaped}
    assert extra["a100-80gb"] > 0.03 and extra["h100-sxm"] > extra["a100-80gb"], (shaped, flat)
