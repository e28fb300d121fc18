"""Predict, then check, in every run: ``train``'s start line, the predicted-vs-measured fields of
``metrics.jsonl`` and ``report.json``, the CPU error held within a bound, and ``validate --gpu``.

The bound (:data:`CPU_STEP_RATIO`) was chosen from the tiny runs recorded in
benchmarks/README_planner.md ("Predicted vs measured in every run"): on a 2-core machine shared
with other jobs (load average 6-12) the measured step moves by 2x from one minute to the next, so
the prediction is held to within a factor, not a percentage; 20 of 21 held-out runs fell within
0.35x-2.12x (the 21st ran through another job's burst). The trainer's earlier predictions fall
outside it: with the cached single-process GEMM peak and the profile's assumed link, TP runs came
out 5-7x too fast; with a copy bandwidth timed on its page-faulting first copy, DP runs 3.9-4.3x
too slow.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from megallama.cli import main
from tests.train_utils import ROOT, run_train, tiny_run_config

CPU_STEP_RATIO = 3.0   # predicted / measured step time within [1/3, 3]


def _records(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# two layouts the cost model prices differently (each run costs 15-35 s; the README's table has
# more): DP's gradient all-reduce with recomputation under ZeRO-2, as `make demo` runs (and the
# micro-batch chosen by auto), and TP's per-block all-reduces with accumulation
LAYOUTS = {
    "dp2-full-auto": ["train.activation_checkpointing.mode=full", "train.micro_batch_size=auto",
                      f"deepspeed={ROOT / 'ds_configs' / 'zero2.json'}"],
    "tp2": ["parallel.tp=2"],
}


def _train(name, tmp, data_cache):
    cfg = tiny_run_config(tmp, data_cache, steps=6)
    return run_train(cfg, [f"run_dir={tmp / 'run'}"] + LAYOUTS[name], world=2)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def run(request, tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp(request.param)
    return request.param, tmp / "run", _train(request.param, tmp, data_cache)


def test_start_line_states_the_prediction_and_the_end_line_the_check(run):
    name, _, report = run
    log = report["stderr"]
    assert "predicted on cpu for " in log and " tokens/s, step " in log and " per rank of " in log, log[-2000:]
    assert "CPU measured at start on all 2 ranks at once" in report["predicted"]["hardware_source"]
    assert report["predicted"]["time_breakdown_s"]["cpu_step_work"] > 0
    assert "predicted vs measured: step " in log
    if name.endswith("auto"):   # global 8 over dp 2: 4 per replica, and the tiny model fits all 4
        assert "train.micro_batch_size: auto chose 4 (x 1 accumulation x 2 data-parallel = global batch 8)" in log
        assert json.loads((run[1] / "config.json").read_text())["train"]["micro_batch_size"] == 4


def test_every_record_carries_prediction_and_error(run):
    _, run_dir, report = run
    pred = report["predicted"]["step_time_s"]
    assert pred > 0 and report["step_time_predicted_s"] == pred
    records = _records(run_dir)
    assert len(records) == 6
    for r in records:
        assert r["step_time_predicted_s"] == pred
        assert r["step_time_error"] == pytest.approx((pred - r["step_time_s"]) / r["step_time_s"])
        assert r["tokens_per_s_predicted"] == pytest.approx(r["tokens_per_s"] * r["step_time_s"] / pred)
        assert r["mem_predicted_bytes"] > 0 and r["mem_error"] is None   # CPU: RSS is no allocator peak
    measured = sorted(r["step_time_s"] for r in records[1:])[2]   # median past the start-up step
    assert report["step_time_s"] == pytest.approx(measured)
    assert report["step_time_error"] == pytest.approx((pred - measured) / measured)


def test_cpu_prediction_within_the_recorded_bound(run, tmp_path, data_cache):
    """A load spike from another job can outlast a 6-step run (one recorded run's step went 10x
    slower than its start measured): outside the bound, the run is repeated once, predicting
    afresh; a wrong model misses twice."""
    name, _, report = run
    ratios = []
    for attempt in range(2):
        ratios.append(report["step_time_predicted_s"] / report["step_time_s"])
        if 1 / CPU_STEP_RATIO <= ratios[-1] <= CPU_STEP_RATIO:
            break
        if attempt == 0:
            report = _train(name, tmp_path, data_cache)
    assert 1 / CPU_STEP_RATIO <= ratios[-1] <= CPU_STEP_RATIO, (
        f"{name}: predicted / measured step x{ratios}; load average {os.getloadavg()}; last prediction "
        f"{report['predicted']['time_breakdown_s']} from {report['predicted']['hardware_source']}")
    assert math.isfinite(report["predicted"]["tokens_per_s"])


def _validate(capsys, *args):
    rc = main(["validate", str(ROOT / "examples" / "llama-7b.yaml"), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_validate_gpu_refuses_a_layout_predicted_not_to_fit_with_the_breakdown(capsys):
    rc, out, err = _validate(capsys, "--world-size", "8", "--gpu", "a100-40gb",
                             "--set", "train.activation_checkpointing.mode=none")
    assert rc == 2
    assert err.count("\n") == 1 and "is predicted not to fit a100-40gb" in err and "per rank" in err, err
    assert "by pipeline stage" in out and "stage 0: " in out and "activations.blocks" in out and "optimizer" in out


def test_validate_gpu_prints_the_prediction_of_a_layout_that_fits(capsys):
    rc, out, err = _validate(capsys, "--world-size", "8", "--gpu", "h100-sxm")
    assert rc == 0 and err == ""
    assert "predicted on h100-sxm for tp1 pp1 dp8 zero1 mbs4 x64 rc=full bf16: " in out and "tokens/s" in out


def test_validate_gpu_names_an_unknown_gpu(capsys):
    rc, _, err = _validate(capsys, "--world-size", "8", "--gpu", "h1000")
    assert rc == 2 and err.count("\n") == 1 and "unknown GPU type 'h1000'" in err
