"""Fault injection: a dead rank never hangs the job; non-finite steps are skipped, then stop."""
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_utils import free_port
from tests.train_utils import ROOT, env, run_train, tiny_run_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("faults"), data_cache)


def _independent_ranks(cfg, run_dir, world, overrides):
    """Ranks started one by one (as srun or a scheduler does): no launcher to kill the others."""
    port, procs = str(free_port()), []
    for rank in range(world):
        e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        e.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                 SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        args = ["train", str(cfg)] + [x for o in overrides + [f"run_dir={run_dir}"] for x in ("--set", o)]
        procs.append(subprocess.Popen([sys.executable, "-m", "megallama"] + args, env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("world,victim", [(2, 1), (4, 2)])
def test_killed_rank_makes_the_others_exit_naming_it(cfg, tmp_path, world, victim):
    run_dir = tmp_path / "run"
    procs = _independent_ranks(cfg, run_dir, world, ["train.steps=100000", "train.heartbeat_timeout_s=20",
                                                      f"train.global_batch_size={4 * world}",
                                                      "train.dist_timeout_s=600", "train.log_every=1"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    for r, p in enumerate(procs):
        if r == victim:
            continue
        _, err = p.communicate(timeout=120)
        assert p.returncode not in (0, None), err[-2000:]
        assert f"rank {victim}" in err and ("died" in err or "stopped responding" in err), err[-2000:]
        assert "Traceback" not in err.split(f"rank {victim}")[-1]
    assert time.time() - killed_at < 60  # bounded: well under the collective timeout


def test_non_finite_steps_are_skipped_counted_then_stop(cfg, tmp_path):
    report = run_train(cfg, ["deepspeed.zero_optimization.stage=0", f"run_dir={tmp_path / 'a'}"],
                       faults=["--nonfinite-steps", "2"])
    assert report["skipped_steps"] == 1 and all(x == x for x in report["losses"][2:])  # finite again
    assert "step 2: optimizer step skipped: non-finite gradients" in report["stderr"]
    r = subprocess.run([sys.executable, "-m", "tests.fault_injection", "--nonfinite-steps", "2,3,4", "train", str(cfg),
                        "--set", "train.max_bad_steps=3", "--set", f"run_dir={tmp_path / 'b'}"], capture_output=True,
                       text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "non-finite for 3 steps in a row (train.max_bad_steps=3)" in r.stderr
    assert "Traceback" not in r.stderr
