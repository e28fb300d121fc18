"""tests/fork_launch.py's ``run_forked`` returns (or raises) within its bound whatever the fork
server does: here it is stopped (SIGSTOP, as a server that never gets round to reaping), or its
report is hidden from the caller, and a rank's end is still read from the rank's own status file or
from its pid. Ranks run this module's ``main``; a rank's words are done in order."""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import os
import resource
import signal
import struct
import subprocess
import threading
import time

import pytest

from tests.fork_launch import LOST_RC, run_forked
from tests.train_utils import ROOT, env

MODULE = "tests.test_fork_launch"
BOUND_S = 25.0  # the old run_forked, here, waited forever: this is the test's own bound on a call


def main(argv) -> int:
    for word in argv:
        key, _, value = word.partition("=")
        if key == "print":
            print(value, flush=True)
        elif key == "sleep":
            time.sleep(float(value))
        elif key == "stop-server":  # the fork server (this rank's parent) stops reaping and reporting
            os.kill(os.getppid(), signal.SIGSTOP)
        elif key == "abort":
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.abort()
        elif key == "shm":  # as DeepSpeed's CPU all-reduce makes (and leaves) its buffer
            env = os.environ
            path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_"
            with open(path + env["RANK"], "wb") as f:
                f.write(b"x")
            print(path + env["RANK"], flush=True)
        elif key == "exit-now":  # gone before the rank writes its own status
            os._exit(int(value))
    return 0


def bounded(argv, world=None, timeout=60.0):
    """``run_forked(argv, ...)`` and its wall time, failing (not hanging) if it takes BOUND_S."""
    box = {}

    def call():
        try:
            box["result"] = run_forked(argv, world, env(), ROOT, timeout, MODULE)
        except BaseException as e:  # noqa: B036 - handed to the test's thread
            box["error"] = e

    start = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    assert not thread.is_alive(), f"run_forked({argv}) still waiting after {BOUND_S:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["result"], time.monotonic() - start


@pytest.fixture
def stopped_server():
    """The fork server is resumed after the test, whatever a rank did to it."""
    yield
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    if pid is not None:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def blind(monkeypatch):
    """The fork server's report on each rank started in the test never reaches the caller (its
    sentinel is a pipe nobody writes), as if the server had missed the exit; it is written after
    the test, so that a caller still waiting is released."""
    pipes = []
    launch = multiprocessing.popen_forkserver.Popen._launch

    def launch_blind(self, process_obj):
        launch(self, process_obj)
        r, w = os.pipe()
        pipes.append((r, w))
        self.sentinel = r

    monkeypatch.setattr(multiprocessing.popen_forkserver.Popen, "_launch", launch_blind)
    yield
    monkeypatch.undo()
    for r, w in pipes:
        os.write(w, struct.pack("q", 0))
        os.close(w)


def test_ranks_that_finished_under_a_silent_fork_server_are_done(stopped_server):
    # the CI hang: both ranks ended, the server reported neither
    proc, took = bounded(["print=hello", "sleep=1", "stop-server"], world=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello\nhello\n"
    assert took < 15, took


def test_a_rank_that_aborts_under_a_silent_fork_server_reports_its_signal(stopped_server):
    proc, took = bounded(["sleep=1", "stop-server", "abort"])
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr)
    assert "Fatal Python error: Aborted" in proc.stderr  # faulthandler: where it aborted
    assert "without writing its status" in proc.stderr
    assert took < 15, took


def test_a_timed_out_rank_under_a_silent_fork_server_raises_in_bound(stopped_server):
    with pytest.raises(subprocess.TimeoutExpired):
        bounded(["sleep=1", "stop-server", "sleep=600"], timeout=4)


def test_an_unreported_rank_is_done_by_its_own_status(blind):
    before = set(multiprocessing.active_children())
    proc, took = bounded(["print=hello"], world=2)
    assert (proc.returncode, proc.stdout) == (0, "hello\nhello\n"), proc.stderr
    assert took < 15, took
    # not left among multiprocessing's children, which it join()s without a bound at exit
    assert set(multiprocessing.active_children()) <= before


def test_an_unreported_rank_gone_without_its_status_fails_with_a_message(blind):
    proc, took = bounded(["print=hello", "exit-now=0"])
    assert proc.returncode == LOST_RC
    assert "is gone without writing its status" in proc.stderr
    assert took < 15, took


def test_an_aborting_rank_gives_its_signal():
    proc, _ = bounded(["abort"], world=2)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr)


def test_a_rank_exit_code_and_exception_come_back():
    proc, _ = bounded(["print=x", "exit-now=3"])
    assert proc.returncode == 3
    proc, _ = bounded(["print=x", "sleep=nan-is-not-a-word"])  # a ValueError in main
    assert proc.returncode == 1 and "ValueError" in proc.stderr


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_a_runs_shared_memory_buffers_are_removed():
    proc, _ = bounded(["shm"], world=2)
    made = proc.stdout.split()
    assert proc.returncode == 0 and len(made) == 2, proc.stderr
    assert not [p for p in made if os.path.exists(p)]
