"""``megallama profile`` under torchrun: a measured PP=2 run reported as JSON beside the planner."""
import json
import subprocess

import pytest

from megallama.commands.profile import _print_text
from megallama.config import load_run_config
from tests.train_utils import ROOT, env, launch_cmd, tiny_run_config

KEYS = ("tokens_per_s", "tflops_per_gpu", "mfu", "hfu", "peak_memory_bytes", "comm_share", "pipeline_bubble")


def test_profile_pipeline_run_reports_measured_beside_predicted(tmp_path, data_cache, capsys):
    cfg = tiny_run_config(tmp_path, data_cache)
    args = ["profile", str(cfg), "--steps", "2", "--warmup", "1", "--json",
            "--set", "parallel.pp=2", "--set", "train.global_batch_size=16", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "train.rampup_batch_size=[8,8,1000]"]   # applied, it would hold every step at 8
    proc = subprocess.run(launch_cmd("torchrun", 2) + args, capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "profile.json").read_text())
    printed, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.rindex("\n{\n") + 1:])
    assert printed == report                                                     # printed on rank 0 too
    for key in KEYS:
        assert key in report, key
    assert report["layout"]["pp"] == 2 and report["layout"]["grad_accum"] == 4 and report["world_size"] == 2
    m, p = report["measured"], report["predicted"]
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] <= m["hfu"] < 1.5 and 0 < m["comm_share"] < 1
    assert m["tflops_per_gpu"] == report["tflops_per_gpu"] > 0
    bubble = report["pipeline_bubble"]
    assert bubble["source"] == "measured" and 0 < bubble["value"] < 1 and set(bubble["per_stage"]) == {"0", "1"}
    assert bubble["predicted"] == 1 / 5                                          # (pp-1)/(m+pp-1)
    for key in ("tokens_per_s", "tflops_per_gpu", "mfu", "hfu", "peak_memory_bytes", "comm_share", "pipeline_bubble"):
        assert p[key] is not None and p[key] >= 0, key
    assert m["collectives_per_step"]["pp"]["payload_bytes"] > 0
    worst = report["model_check_worst_error"]
    assert worst and all(err is not None and abs(err) <= 0.05 for err in worst.values()), worst
    # the ramp is said to be left out, and was: each timed step sent four micro-batches' activations
    # (4 x 64 x dim fp32) forward and their gradients back over the stage boundary, not the ramp's two
    assert report["batch_ramp"]["applied"] is False and report["batch_ramp"]["global_batch"] == 16
    dim = load_run_config(cfg).model.dim
    assert m["collectives_per_step"]["pp"]["payload_bytes"] == pytest.approx(2 * 4 * 4 * 64 * dim * 4, rel=1e-3)
    _print_text(report)
    assert "measured at the full global batch 16 every step; train.rampup_batch_size [8, 8, 1000] is not applied" \
        in capsys.readouterr().out


def test_profile_bad_steps_is_one_line(tmp_path, data_cache, capsys):
    from megallama.cli import main

    rc = main(["profile", str(tiny_run_config(tmp_path, data_cache)), "--steps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--steps" in err[0]


def test_scaling_sweep_draws_measured_beside_predicted(tmp_path):
    """``tools/scaling_sweep.py --from-runs``: a measured and a predicted row per profile run, and the plot."""
    import csv
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import scaling_sweep

    (tmp_path / "runs" / "pp2").mkdir(parents=True)
    shutil.copyfile(ROOT / "benchmarks" / "results" / "profile_tiny_pp2.json",
                    tmp_path / "runs" / "pp2" / "profile.json")
    assert scaling_sweep.main(["--from-runs", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "scaling_measured.csv").open()))
    assert [r["source"] for r in rows] == ["measured", "predicted"] and {r["pp"] for r in rows} == {"2"}
    assert all(float(r["tokens_per_s"]) > 0 and float(r["memory_per_gpu_gib"]) > 0 for r in rows)
    assert (tmp_path / "scaling_measured.png").stat().st_size > 10000
