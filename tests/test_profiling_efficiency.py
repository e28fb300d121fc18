"""GEMM time depends on the shapes and the machine (megallama/profiling/efficiency.py): small
per-rank GEMMs run below the ceiling, more so on H100 (twice the A100's FLOP/byte balance); and
the step-time model actually uses that dependence."""
import dataclasses

import pytest

from megallama.profiling import efficiency as eff_mod
from megallama.profiling.efficiency import Gemm, achievable_bandwidth, gemm_seconds, intensity
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.steptime import Efficiency, predict, zero3_exposed

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
    """Flash attention's rate, the sustained clock and ZeRO-3's contention
    are the only per-generation constants: an H200 takes its H100's, a generation without a fit
    the stated defaults, a measured CPU none."""
    assert eff_mod.attention_kernel_fraction(A100) > eff_mod.attention_kernel_fraction(H100)
    h200, cpu = load_hardware("h200"), dataclasses.replace(A100, name="cpu", measured=True)
    assert eff_mod.attention_kernel_fraction(h200) == eff_mod.ATTENTION_KERNEL["h100"]
    assert eff_mod.sustained_clock(h200) == eff_mod.SUSTAINED_CLOCK["h100"] < eff_mod.sustained_clock(A100) == 1.0
    other = dataclasses.replace(H100, name="b200")
    assert eff_mod.attention_kernel_fraction(other) == eff_mod.ATTENTION_KERNEL[eff_mod.ATTENTION_KERNEL_DEFAULT]
    assert eff_mod.sustained_clock(other) == 1.0 and eff_mod.sustained_clock(cpu) == 1.0
    assert eff_mod.contention(h200) == eff_mod.contention(other) == eff_mod.CONTENTION["h100"]
    assert eff_mod.contention(cpu) == 0.0 and 0 < eff_mod.contention(A100) < 1
    assert eff_mod.cross_node_fraction(A100) == eff_mod.cross_node_fraction(cpu) == 1.0


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


def test_zero3_exchange_hides_behind_each_block_only_up_to_that_blocks_compute():
    """ZeRO-3 prefetches one block ahead: each block takes the longer of its compute and its
    exchange, and the first gather and the last reduce-scatter show. 10 blocks, 1 s of compute
    per micro-batch, a quarter of it forward (full recompute)."""
    def z(gather, back):   # seconds per step (one micro-batch) of each kind
        return {"gather": gather, "regather": back / 2, "reduce_scatter": back / 2}
    short = zero3_exposed(z(0.2, 0.4), 1.0, 1, 10, 0.25)   # 0.02 s per block vs 0.025 forward
    assert short == pytest.approx(0.02 + 0.02)             # only the ends
    long = zero3_exposed(z(0.5, 1.0), 1.0, 1, 10, 0.25)    # forward gathers 0.05 > 0.025 per block
    assert long == pytest.approx(10 * (0.05 - 0.025) + 10 * (0.1 - 0.075) + 0.05 + 0.05)
    # the same exchange per step over 4 micro-batches: a quarter per block, hidden; the ends show
    assert zero3_exposed(z(0.5, 1.0), 1.0, 4, 10, 0.25) == pytest.approx(0.0125 + 0.0125)
    assert zero3_exposed({"gather": 0.0, "regather": 0.0, "reduce_scatter": 0.0}, 1.0, 1, 10, 0.25) == 0.0


def test_hidden_exchange_costs_its_contention_share_of_the_time_it_hides_behind():
    """NCCL's kernels share the SMs: each block adds ``contention`` x the shorter of its compute
    and its exchange, so a fully hidden exchange is no longer free, and an exposed one costs
    the compute it overlapped as well. Same 10 blocks as above."""
    z = {"gather": 0.2, "regather": 0.2, "reduce_scatter": 0.2}   # hidden: 0.02 < 0.025, 0.04 < 0.075
    free = zero3_exposed(z, 1.0, 1, 10, 0.25)
    assert zero3_exposed(z, 1.0, 1, 10, 0.25, contention=0.5) == pytest.approx(free + 0.5 * (0.2 + 0.4))
    long = {"gather": 0.5, "regather": 0.5, "reduce_scatter": 0.5}   # forward exposed, backward not
    assert (zero3_exposed(long, 1.0, 1, 10, 0.25, contention=0.5) - zero3_exposed(long, 1.0, 1, 10, 0.25)
            == pytest.approx(0.5 * (0.25 + 0.75)))


def test_zero3_exposed_where_each_forward_block_outruns_its_gather_less_than_the_step():
    """The case a share-of-the-step rule misses: the whole exchange (0.6 s) is well under 0.8 of
    the compute (1 s), yet each forward block (0.025 s) is shorter than its gather (0.03 s)."""
    exposed = zero3_exposed({"gather": 0.3, "regather": 0.15, "reduce_scatter": 0.15}, 1.0, 1, 10, 0.25)
    assert exposed == pytest.approx(10 * 0.005 + 0.03 + 0.015) and exposed > 0.09


def test_cross_node_share_slows_only_rings_that_leave_the_node():
    """``cross_node`` scales the NICs, not NVLink: ZeRO-3 over one node is unchanged by it, over
    8 nodes it takes longer, by less than the inverse (the rings' latency does not scale)."""
    from megallama.profiling.comm import zero3_exchange
    def total(gpus: int, share: float) -> float:
        lay = Layout(dp=gpus, zero=3, mbs=2, grad_accum=1, recompute="full", gpus_per_node=8)
        return sum(zero3_exchange("llama2-70b", lay, A100, 0, 0.8, share).values())
    assert total(8, 0.25) == total(8, 1.0)
    assert 2.0 < total(64, 0.25) / total(64, 1.0) < 4.0
