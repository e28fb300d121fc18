"""Every wait is bounded: a stopped peer ends its partners' collectives within
``train.dist_timeout_s`` even with the heartbeat watchdog off, and a signal to the ``deepspeed``
runner reaches the ranks (the single-node runner exits without passing it on)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_utils import free_port, sigint_as_a_terminal_has
from tests.train_utils import BIN, ROOT, env, tiny_run_config

LONG = ["train.steps=100000", "train.log_every=1", "train.global_batch_size=8", "train.seq_len=32",
        "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("waits"), data_cache)


def _wait_for_steps(run_dir, procs, n=2, limit=240):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + limit
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "training never got going"
        time.sleep(0.2)


def test_a_stopped_rank_ends_its_peers_wait_within_dist_timeout(cfg, tmp_path):
    """SIGSTOP (alive, silent, holding its sockets) with the watchdog off: only the process
    groups' timeout can end the wait, and it must be train.dist_timeout_s, not torch's 30 min."""
    run_dir, port, procs = tmp_path / "run", str(free_port()), []
    overrides = LONG + ["train.heartbeat_timeout_s=0", "train.dist_timeout_s=10", f"run_dir={run_dir}"]
    for rank in range(2):
        e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        e.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost",
                 MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "megallama", "train", str(cfg)]
                                      + [x for o in overrides for x in ("--set", o)], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_steps(run_dir, procs)
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - stopped_at
        assert procs[0].returncode not in (0, None), err[-2000:]
        assert waited < 10 + 30, f"rank 0 waited {waited:.0f}s for a stopped peer (dist_timeout_s=10)"
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_deepspeed_runner_stops_the_ranks(cfg, tmp_path, sig):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megallama",
           "train", str(cfg)] + [x for o in LONG + [f"run_dir={run_dir}"] for x in ("--set", o)]
    log = open(tmp_path / "runner.log", "w")
    runner = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=sigint_as_a_terminal_has)
    group = runner.pid  # the runner leads a new session: the launcher and ranks live in its group
    try:
        _wait_for_steps(run_dir, [runner])
        runner.send_signal(sig)
        runner.wait(timeout=30)
        sent = time.time()
        while time.time() - sent < 30:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"ranks still running 30 s after {sig.name} to the deepspeed runner")
        assert "launcher process" in (tmp_path / "runner.log").read_text()  # they stopped because it went
    finally:
        log.close()
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
