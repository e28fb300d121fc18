"""Preemption: a SIGTERM to the launcher, a SIGTERM that reaches one rank only, and
``train.time_limit_min`` each stop every rank at the same step with a checkpoint of that step
(steps lost 0) and exit 75; each resume continues the uninterrupted run's losses exactly (fp32)."""
import json
import re
import signal
import subprocess
import time

import psutil
import pytest

from megallama.errors import PREEMPTED_EXIT
from tests.dist_utils import sigint_as_a_terminal_has
from tests.train_utils import ROOT, env, launch_cmd, run_train, tiny_run_config

STEPS = 8
SETS = [f"train.steps={STEPS}", "train.warmup_steps=1", "checkpoint.every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("preempt"), data_cache)


def _start(cfg, run_dir, faults=(), sets=()):
    args = list(faults) + ["train", str(cfg)] + [x for o in SETS + list(sets) + [f"run_dir={run_dir}"]
                                                 for x in ("--set", o)]
    return subprocess.Popen(launch_cmd("torchrun", 2, "tests.fault_injection") + args, env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _preempted(proc, run_dir, ranks=()):
    """The report of a preempted run, checked: checkpoint of the last completed step, no rank left."""
    out, err = proc.communicate(timeout=240)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["preempted"], f"{out[-2000:]}\n{err[-4000:]}"
    end = report["end_step"]
    assert report["checkpoint_step"] == end == report["start_step"] + len(report["losses"]) and end < STEPS
    assert f"stopped at step {end} of {STEPS}, checkpoint step {end}, steps lost 0; exit 75" in out, out[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{end:08d}"
    assert json.loads((run_dir / "checkpoints" / f"step{end:08d}" / "meta.json").read_text())["step"] == end
    for pid in ranks:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"rank {pid} left"
    return report, out, err


def test_preempted_runs_resume_with_no_step_lost(cfg, tmp_path):
    ref = run_train(cfg, SETS + [f"run_dir={tmp_path / 'ref'}"], world=2)["losses"]
    assert len(ref) == STEPS
    run_dir = tmp_path / "run"

    # 1. SIGTERM to torchrun, which passes it on to both ranks, mid-run
    proc = _start(cfg, run_dir, faults=["--slow-steps-s", "0.4"])
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    ranks = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    first, _, err = _preempted(proc, run_dir, ranks)
    assert "SIGTERM received" in err and first["preempted"] == "preempted by SIGTERM"
    stop = first["end_step"]
    assert first["losses"] == ref[:stop]

    # 2. resumed; SIGTERM reaches rank 1 alone, as step stop+2 begins: both ranks stop after it
    proc = _start(cfg, run_dir, faults=["--signal-at", f"{stop + 2}:1"])
    second, out, err = _preempted(proc, run_dir)
    assert second["start_step"] == stop and second["end_step"] == stop + 2, out[-2000:]
    assert second["preempted"] == "preempted by a signal to another rank"  # rank 0's view
    assert re.search(rf"exitcode\s*:\s*{PREEMPTED_EXIT}\b", err), err[-3000:]
    assert second["losses"] == ref[stop:stop + 2]

    # 3. resumed under a time limit already spent by start-up: one step, then a checkpoint
    proc = _start(cfg, run_dir, sets=["train.time_limit_min=0.001"])
    third, _, err = _preempted(proc, run_dir)
    assert third["preempted"] == "train.time_limit_min=0.001 nearly reached" and third["end_step"] == stop + 3
    assert re.search(rf"exitcode\s*:\s*{PREEMPTED_EXIT}\b", err), err[-3000:]
    assert third["losses"] == ref[stop + 2:stop + 3]


def test_a_second_signal_during_the_save_lets_it_finish(cfg, tmp_path):
    """SIGTERM as step 2 begins, then Ctrl-C while the checkpoint is being written: the save
    completes (manifest verified, ``latest`` on it), the process exits 75 and nothing is left."""
    from megallama.train.checkpoint import verify

    run_dir = tmp_path / "run"
    args = ["--signal-at", "2:0", "--slow-save-s", "3", "train", str(cfg)] + \
        [x for o in SETS + [f"run_dir={run_dir}"] for x in ("--set", o)]
    proc = subprocess.Popen(launch_cmd("none", 1, "tests.fault_injection") + args, env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_a_terminal_has)
    tag = run_dir / "checkpoints" / "step00000002"
    deadline = time.time() + 180
    while not (tag / "universal").exists():  # the save is under way (held open before its manifest)
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "SIGINT again: already stopping" in err and "Traceback" not in err, err[-3000:]
    assert verify(tag) is None and (run_dir / "checkpoints" / "latest").read_text().strip() == tag.name
    assert "stopped at step 2 of 8, checkpoint step 2, steps lost 0" in out
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_time_limit_reserves_a_step_and_a_save(monkeypatch):
    from megallama.train import preemption

    now = [1000.0]
    monkeypatch.setattr(preemption.time, "time", lambda: now[0])
    monkeypatch.setattr(preemption, "_process_start", lambda: 1000.0)
    p = preemption.Preemption(10.0, None)  # 600 s
    now[0] += 500
    assert p.should_stop(step_s=60.0) is None  # 500 + 60 + 30 (5% of the limit: no save measured yet) < 600
    p.saved(45.0)
    assert p.should_stop(step_s=50.0) == "train.time_limit_min=10 nearly reached"  # 500 + 60 + 45 >= 600
    assert preemption.Preemption(None, None).should_stop(1e9) is None
