"""The planner against published runs. Megatron Table 1 (Narayanan et al. 2021): median |error|
of per-GPU TFLOP/s <= 15%, no row off by more than 30%. MPT and torchtitan (FSDP, A100 and H100,
:mod:`megallama.profiling.published_runs`): per GPU generation, on the rows the fit did not see,
the median |error| of tokens/s/GPU within the issue's 10% target; the worst within the bounds
reached today (:data:`HELD_OUT_MAX`, benchmarks/README_planner.md: on A100, MPT 30B at 8,192
tokens on 8 GPUs ran slower than its neighbours for no reason the model sees, and MPT 70B on 64
A100-40GB ran on a cluster whose NICs reached less than the others')."""
import dataclasses


import pytest

from megallama.profiling.flops import flops_per_token, megatron_formula_flops_per_token, parameter_count
from megallama.profiling.published import CALIBRATION_ROWS, MEGATRON_TABLE1, summary, validate
from megallama.profiling.calibration import calibrate
from megallama.profiling import efficiency as eff_mod
from megallama.profiling.comm import comm_time_by_phase, zero3_part
from megallama.profiling.published_runs import (PUBLISHED_RUNS, by_generation, hardware, is_calibration, remeasured,
                                                 validate_runs)
from megallama.profiling.steptime import Efficiency, predict

HELD_OUT_MEDIAN = 0.10                     # issue 17's target, every generation
# A100: over the 25% on MPT 30B at 8K, MPT 70B on 64 A100-40GB, and two configurations
# whose own two published measurements disagree by 11-20% (README_planner.md).
# H100: within it since the NICs run at their nominal bus bandwidth and hidden exchange costs
# compute (``Efficiency.contention``) in place of a share of the NICs fitted on MPT's 32-GPU rows
# (0.35), under which torchtitan's 405B was 36% slow.
HELD_OUT_MAX = {"a100": 0.32, "h100": 0.25}


@pytest.fixture(scope="module")
def megatron():
    return validate()


@pytest.fixture(scope="module")
def runs():
    return validate_runs()


def test_table_rows_are_the_papers_models():
    for row in MEGATRON_TABLE1:
        spec = row.spec()
        assert parameter_count(spec) / 1e9 == pytest.approx(row.params_b, rel=0.03)
        assert flops_per_token(spec, 2048, "full").hardware == pytest.approx(
            megatron_formula_flops_per_token(spec, 2048), rel=1e-12)
        assert row.gpus % (row.tp * row.pp) == 0 and row.batch % row.dp == 0


def test_mpt_rows_are_the_published_models():
    """Their NumParams column, reproduced exactly from the yaml shapes (7B, 1B at two lengths)."""
    by_key = {(r.model, r.seq): r for r in PUBLISHED_RUNS if r.source == "mpt"}
    for key, published in ((("7b", 2048), 6658859008), (("1b", 65536), 1445974016), (("125m", 512), 124131840)):
        assert parameter_count(by_key[key].spec()) == published


def test_planner_meets_the_validation_target(megatron):
    s = summary(megatron)
    assert s["median_abs_error"] <= 0.15 and s["max_abs_error"] <= 0.30, s
    assert s["median_abs_error_held_out"] <= 0.15 and s["max_abs_error_held_out"] <= 0.30, s
    assert sum(r.calibration for r in megatron) == len(CALIBRATION_ROWS)
    for r in megatron:
        assert r.prediction.fits
        lay = r.prediction.layout
        assert (lay.tp, lay.pp, lay.dp, lay.global_batch) == (r.row.tp, r.row.pp, r.row.dp, r.row.batch)


def test_held_out_error_per_generation(runs, megatron):
    gens = by_generation(runs, megatron)
    assert set(gens) == {"a100", "h100"}
    for gen, v in gens.items():
        assert v["held_out_rows"] >= 40 and v["fit_rows"] <= 9, (gen, v)
        assert v["held_out_median"] <= HELD_OUT_MEDIAN, (gen, v)
        assert v["held_out_max"] <= HELD_OUT_MAX[gen], (gen, v)
    for r in runs:   # layouts as published
        lay = r.prediction.layout
        assert (lay.world, lay.mbs, lay.grad_accum, lay.zero) == (r.run.gpus, r.run.mbs, r.run.accum, r.run.zero)


def test_fit_set_is_small_and_stated():
    fit = [r for r in PUBLISHED_RUNS if is_calibration(r)]
    assert len(fit) == 8 and {r.gpu for r in fit} == {"a100-40gb", "a100-80gb", "h100-sxm"}
    assert sorted((r.gpu, r.gpus) for r in fit if r.gpus > 8) == [("a100-80gb", 32), ("h100-sxm", 32)]


def test_zero3_exposure_follows_the_work_per_block(runs):
    """MPT 70B on A100-40GB: at 64 GPUs and 2 sequences each, a block's gather across nodes
    outlasts its forward and the run is 27% slower per GPU than at 128 GPUs and 4 sequences,
    where the exchange hides. The per-block model exposes more of it at 64 GPUs at any share of
    the NICs; at a quarter of them (what this pair implies for that cluster, a ``cross_node_share``
    a measurement there would state) both rows come within 12%. At the nominal bandwidth the 64-GPU
    row is its table's worst (README_planner.md)."""
    by = {(r.run.gpu, r.run.model, r.run.gpus): r for r in runs}
    small, big = by["a100-40gb", "70b", 64], by["a100-40gb", "70b", 128]
    assert small.run.tokens_per_s_per_gpu / big.run.tokens_per_s_per_gpu < 0.75
    exposed = [r.prediction.time["dp_comm_exposed"] / r.prediction.step_time_s for r in (small, big)]
    assert exposed[0] > 1.5 * exposed[1], exposed
    for r in (small.run, big.run):
        hw = dataclasses.replace(hardware(r), cross_node_share=0.25)
        p = predict(r.spec(), r.layout(hw), r.seq, hw, impl=r.impl)
        assert abs(p.tokens_per_s_per_gpu / r.tokens_per_s_per_gpu - 1) < 0.12, (r.name, p.tokens_per_s_per_gpu)


def test_no_published_run_needs_more_exchange_than_its_whole_step():
    """A run cannot finish a step sooner than its ZeRO-3/FSDP traffic takes. At the NICs' share the
    planner uses, every published run's exchange fits in its measured step with room to spare;
    the share fitted on MPT's 32-GPU rows before (0.24 A100, 0.35 H100) would have had torchtitan's
    405B, its Llama 2 70B and MPT's own 13B on 32 and 64 H100 exchange longer than they ran."""
    eff = Efficiency()
    for r in PUBLISHED_RUNS:
        hw = hardware(r)
        lay = r.layout(hw)
        share = eff_mod.cross_node_fraction(hw)
        z = zero3_part(comm_time_by_phase(r.spec(), lay, r.seq, hw, 0, eff.bus, r.impl, False, share))
        measured_step = lay.global_batch * r.seq / (r.tokens_per_s_per_gpu * lay.world)
        assert sum(z.values()) < 0.75 * measured_step, (r.name, sum(z.values()), measured_step)


def test_shipped_constants_are_what_calibration_finds():
    assert calibrate() == Efficiency()


def test_a_configuration_measured_twice_is_costed_twice_and_never_fitted(runs):
    """MPT's A100 80GB table in both its published versions: each measurement with its own mixed
    precision, the earlier one never in the fit. The source's repeatability is what the worst
    rows are judged against: its 760M at 512 tokens, 20% slower the second time, is within 5% of
    the prediction the first."""
    pairs = remeasured(runs)
    assert len(pairs) >= 50
    for later, earlier in pairs:
        assert (later.run.model, later.run.seq, later.run.gpus) == (earlier.run.model, earlier.run.seq, earlier.run.gpus)
        assert earlier.run.reduce_dtype == "bf16" and not earlier.calibration
    assert sum(r.run.source == "mpt-2023-07" for r in runs) == 84
    assert not any(r.calibration for r in runs if r.run.source == "mpt-2023-07")
    small = next((a, b) for a, b in pairs if (a.run.model, a.run.seq) == ("760m", 512))
    assert small[0].run.tokens_per_s_per_gpu / small[1].run.tokens_per_s_per_gpu < 0.85
    assert abs(small[1].error) < 0.05 < small[0].error


def test_held_out_node_spanning_zero3_rows_agree(runs):
    """The A100 table's earlier nine rows whose ZeRO-3 spans 2-8 nodes with every block recomputed
    (7B-30B, 10-32 sequences per GPU): compute-bound, their exchange hidden, as the model has it.
    They do not pin the contention (without it they are within 2.4%) but do rule out a slower
    fabric than nominal (the old fitted share, 0.24, put 30B on 16 GPUs 6% low)."""
    spanning = [r for r in runs if r.run.source == "mpt-2023-07" and r.run.gpus > 8 and r.run.recompute == "full"]
    assert len(spanning) == 9
    assert max(abs(r.error) for r in spanning) < 0.03, [(r.run.name, round(r.error, 3)) for r in spanning]
