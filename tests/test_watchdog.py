"""The heartbeat watchdog's judgement, in-process: which peers it may declare dead, and when.

The kill-a-rank end-to-end runs are in test_faults.py; here the heartbeat files of peers are
written by hand so multi-node layouts (a node-local or a shared run directory, skewed clocks)
can be checked on one machine.
"""
import json
import os
import time

import pytest

from megallama.train.watchdog import Watchdog, local_world_size

TIMEOUT = 0.3


@pytest.fixture
def two_nodes(monkeypatch):
    """This rank is rank 0 of 4, two per node."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE",
                "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")


def beat(dog: Watchdog, rank: int, host: str, t: float, pid: int = None) -> None:
    dog.dir.mkdir(parents=True, exist_ok=True)
    (dog.dir / f"rank{rank}").write_text(json.dumps({"launch": dog.launch, "pid": pid or os.getpid(), "host": host,
                                                     "t": t}))


def test_local_world_size_from_each_launcher():
    assert local_world_size({"LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun
    assert local_world_size({"LOCAL_SIZE": "4"}) == 4  # deepspeed
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert local_world_size({"MPI_LOCALNRANKS": "2"}) == 2  # MPICH hydra
    assert local_world_size({"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "4"}) == 4
    assert local_world_size({"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4"}) is None
    assert local_world_size({}) is None


def test_node_local_run_dir_never_condemns_the_other_node(tmp_path, two_nodes):
    """Ranks 2 and 3 write their heartbeats on their own disk: rank 0 cannot see them and must not
    kill a healthy job for it (the process-group timeout still bounds a real failure)."""
    dog = Watchdog(str(tmp_path), rank=0, world=4, timeout_s=TIMEOUT, interval_s=0.05)
    dog.started -= 10 * TIMEOUT
    beat(dog, 1, dog.host, time.time())
    assert dog.dead_rank() is None


def test_shared_run_dir_names_the_rank_that_never_reported(tmp_path, two_nodes):
    dog = Watchdog(str(tmp_path), rank=0, world=4, timeout_s=TIMEOUT, interval_s=0.05)
    beat(dog, 1, dog.host, time.time())
    beat(dog, 2, "other-node", time.time())  # seen: the run directory is shared
    assert dog.dead_rank() is None  # within the timeout nobody is condemned
    dog.started -= 10 * TIMEOUT
    assert dog.dead_rank() == f"rank 3 never reported a heartbeat within {TIMEOUT:.0f}s"


def test_one_node_judges_a_peer_that_never_started(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    dog = Watchdog(str(tmp_path), rank=0, world=2, timeout_s=TIMEOUT, interval_s=0.05)
    assert dog.dead_rank() is None
    dog.started -= 10 * TIMEOUT
    assert "rank 1 never reported" in dog.dead_rank()


def test_skewed_clock_on_another_node_is_not_staleness(tmp_path, two_nodes):
    """Rank 2's host clock runs an hour behind: its stamps keep changing, so it is alive; once
    they stop changing for the timeout (by this host's clock) it is named."""
    dog = Watchdog(str(tmp_path), rank=0, world=4, timeout_s=TIMEOUT, interval_s=0.05)
    beat(dog, 1, dog.host, time.time())
    skewed = time.time() - 3600
    for i in range(4):
        beat(dog, 1, dog.host, time.time())
        beat(dog, 2, "other-node", skewed + i)
        beat(dog, 3, "other-node", skewed + i)
        assert dog.dead_rank() is None
        time.sleep(TIMEOUT / 2)
    for _ in range(3):  # rank 3 keeps beating, rank 2 has stopped
        beat(dog, 1, dog.host, time.time())
        beat(dog, 3, "other-node", skewed + 10 + _)
        time.sleep(TIMEOUT / 2)
    problem = dog.dead_rank()
    assert problem is not None and problem.startswith("rank 2 (pid") and "stopped responding" in problem


def test_dead_process_on_this_host_is_named_at_once(tmp_path, two_nodes):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dog = Watchdog(str(tmp_path), rank=0, world=4, timeout_s=60, interval_s=0.05)
    beat(dog, 1, dog.host, time.time(), pid=gone.pid)
    assert dog.dead_rank() == f"rank 1 (pid {gone.pid} on {dog.host}) died"


def test_finished_peer_is_not_dead(tmp_path, two_nodes):
    dog = Watchdog(str(tmp_path), rank=0, world=4, timeout_s=TIMEOUT, interval_s=0.05)
    (dog.dir).mkdir(parents=True)
    (dog.dir / "rank1").write_text(json.dumps({"launch": dog.launch, "done": True}))
    dog.started -= 10 * TIMEOUT
    for i in range(4):
        beat(dog, 2, "other-node", time.time())
        beat(dog, 3, "other-node", time.time())
        assert dog.dead_rank() is None
        time.sleep(TIMEOUT / 2)


def test_another_launch_is_not_this_one(tmp_path, two_nodes):
    """Heartbeats left by an earlier run in the same run directory do not count as reports."""
    dog = Watchdog(str(tmp_path), rank=0, world=4, timeout_s=TIMEOUT, interval_s=0.05)
    beat(dog, 2, "other-node", time.time())
    for r in (1, 3):
        (dog.dir / f"rank{r}").write_text(json.dumps({"launch": "old:1:x", "pid": 1, "host": dog.host, "t": 0}))
    dog.started -= 10 * TIMEOUT
    assert dog.dead_rank() == f"rank 1 never reported a heartbeat within {TIMEOUT:.0f}s"
