"""The planner against Table 1 of Narayanan et al. 2021 (Megatron-LM): median |error| of per-GPU
TFLOP/s <= 15%, no row off by more than 30%, on the calibration rows and the held-out ones."""
import pytest

from megallama.profiling.flops import flops_per_token, megatron_formula_flops_per_token, parameter_count
from megallama.profiling.published import CALIBRATION_ROWS, MEGATRON_TABLE1, calibrate, summary, validate
from megallama.profiling.steptime import Efficiency


def test_table_rows_are_the_papers_models():
    for row in MEGATRON_TABLE1:
        spec = row.spec()
        assert parameter_count(spec) / 1e9 == pytest.approx(row.params_b, rel=0.03)
        assert flops_per_token(spec, 2048, "full").hardware == pytest.approx(
            megatron_formula_flops_per_token(spec, 2048), rel=1e-12)
        assert row.gpus % (row.tp * row.pp) == 0 and row.batch % row.dp == 0


def test_planner_meets_the_validation_target():
    results = validate()
    s = summary(results)
    assert s["median_abs_error"] <= 0.15 and s["max_abs_error"] <= 0.30, s
    assert s["median_abs_error_held_out"] <= 0.15 and s["max_abs_error_held_out"] <= 0.30, s
    assert sum(r.calibration for r in results) == len(CALIBRATION_ROWS)
    for r in results:
        assert r.prediction.fits
        lay = r.prediction.layout
        assert (lay.tp, lay.pp, lay.dp, lay.global_batch) == (r.row.tp, r.row.pp, r.row.dp, r.row.batch)


def test_shipped_constants_are_what_calibration_finds():
    found = calibrate()
    assert (found.gemm, found.traffic) == (Efficiency().gemm, Efficiency().traffic)
