"""A thread still inside a native call when a command ends never turns its exit into an abort."""
import subprocess
import sys
import time

import pytest

from tests.train_utils import ROOT

SCRIPT = """
import sys, threading, time, torch
from megallama.cli import end_process
from megallama.native_calls import native_call
torch.set_num_threads(1)
a = torch.randn(1200, 1200)
calls, grace, plain = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "plain"
def busy():  # each torch.mm releases the GIL and takes it back when it returns
    with native_call():
        for _ in range(calls):
            torch.mm(a, a)
threading.Thread(target=busy, daemon=True).start()
time.sleep(0.2)
print("command done", flush=False)
sys.exit(7) if plain else end_process(7, grace)
"""


def _run(calls: int, grace: float, how: str):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(calls), str(grace), how], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def _mm_seconds() -> float:
    import torch
    torch.set_num_threads(1)
    a = torch.randn(1200, 1200)
    start = time.monotonic()
    for _ in range(3):
        torch.mm(a, a)
    return (time.monotonic() - start) / 3


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 no longer ends such threads with pthread_exit")
def test_a_plain_exit_with_a_native_call_out_aborts():
    """The failure itself (seen in CI as a finished rank's exit -6): without the entry's wait."""
    proc, _ = _run(400, 0.0, "plain")
    assert proc.returncode == -6 and "terminate called without an active exception" in proc.stderr


def test_the_entry_waits_for_a_call_that_comes_back():
    calls = max(2, int(1.0 / _mm_seconds()))
    proc, took = _run(calls, 60.0, "entry")
    assert proc.returncode == 7, proc.stderr
    assert "terminate called" not in proc.stderr and "command done" in proc.stdout


def test_a_call_still_out_after_the_grace_ends_the_process_without_finalizing():
    proc, took = _run(100000, 0.3, "entry")
    assert proc.returncode == 7, proc.stderr
    assert "terminate called" not in proc.stderr and "command done" in proc.stdout  # flushed first
    assert took < 30


def test_the_watchdogs_store_requests_are_marked_as_native_calls():
    import threading

    from megallama import native_calls
    from megallama.train.watchdog import Watchdog

    marked = []

    class Store:
        def set(self, key, value):
            with native_calls._lock:
                marked.append(threading.current_thread() in native_calls._inside)

    Watchdog(0, 2, timeout_s=5.0, connect=Store, store_name="test")._op("set", "hb/0", "{}")
    assert marked == [True] and native_calls.settled(0.0)


def test_both_process_entries_end_through_the_guarded_exit():
    assert "megallama=megallama.cli:run" in (ROOT / "setup.py").read_text()
    assert "run()" in (ROOT / "megallama" / "__main__.py").read_text()
