"""The watchdog's judgement, in-process, over a real TCPStore: which peers and nodes it declares
lost, and when.

The kill-a-rank end-to-end runs are in test_faults.py, the node-loss runs on the virtual cluster in
test_node_faults.py; here the heartbeats of peers are written by hand, so peers on other hosts
(the ``host`` field) and a lost judge or store can be checked on one machine.
"""
import datetime
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from megallama.train.watchdog import Watchdog, node_lost, rank_list

TIMEOUT = 0.3
OTHER = "other-node"


@pytest.fixture
def store():
    """The store's server, seen through the namespace the watchdogs under test use."""
    master = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    yield dist.PrefixStore("t", master)
    del master


def client(host, port, prefix="t"):
    return lambda: dist.PrefixStore(prefix, dist.TCPStore(host, port, 1, False, wait_for_workers=False,
                                                          timeout=datetime.timedelta(seconds=1)))


def dog(store, rank=0, world=4, timeout=TIMEOUT, prefix="t"):
    return Watchdog(rank, world, timeout, interval_s=0.05,
                    connect=client("127.0.0.1", store.underlying_store.port, prefix), store_name="127.0.0.1:store")


def beat(store, rank, host, n, pid=None, done=False):
    store.set(f"hb/{rank}", json.dumps({"host": host, "pid": pid or os.getpid(), "n": n, "done": done}))


def verdict(store, n, host=OTHER, problem=None, done=False):
    store.set("verdict", json.dumps({"n": n, "host": host, "problem": problem, "done": done}))


def test_rank_lists_and_node_lines():
    assert rank_list([5, 0, 2, 1]) == "0-2,5" and rank_list([3]) == "3"
    assert node_lost("vnode1", [2, 3], "no heartbeat for 5s") == "node vnode1 (ranks 2-3) lost: no heartbeat for 5s"
    assert node_lost("vnode1", [2], "x") == "node vnode1 (rank 2) lost: x"


def test_judge_names_the_rank_that_never_reported(store):
    judge = dog(store)
    for n in range(3):
        beat(store, 1, judge.host, n)
        beat(store, 2, OTHER, n)
        assert judge.dead_rank() is None  # within the timeout nobody is condemned
    judge.started -= 10 * TIMEOUT
    assert judge.dead_rank() == f"rank 3 never reported a heartbeat within {TIMEOUT:.0f}s"
    assert json.loads(store.get("verdict"))["problem"] == judge.dead_rank()  # published for every rank


def test_judge_names_a_silent_node_and_its_ranks(store):
    """Both ranks of the other node stop together: the node is named. A counter that keeps
    changing is life whatever the peer's clock says (there is no timestamp to skew)."""
    judge = dog(store)
    for n in range(4):
        for r, host in ((1, judge.host), (2, OTHER), (3, OTHER)):
            beat(store, r, host, n)
        assert judge.dead_rank() is None
        time.sleep(TIMEOUT / 2)
    stopped, problem, n = time.monotonic(), None, 4
    while problem is None and time.monotonic() - stopped < 10 * TIMEOUT:
        beat(store, 1, judge.host, n)
        problem, n = judge.dead_rank(), n + 1
        time.sleep(TIMEOUT / 10)
    assert time.monotonic() - stopped > TIMEOUT
    assert problem is not None and problem.startswith(f"node {OTHER} (ranks 2-3) lost: no heartbeat for "), problem


def test_judge_names_one_stuck_rank_when_its_node_mate_lives(store):
    judge = dog(store)
    judge.interval = TIMEOUT / 3  # a node-mate silent less than 3 intervals is alive (a loaded machine hiccups)
    for n in range(8):
        beat(store, 1, judge.host, n)
        beat(store, 3, OTHER, n)
        if n < 2:
            beat(store, 2, OTHER, n)  # then stuck: alive, silent
        problem = judge.dead_rank()
        time.sleep(TIMEOUT / 2)
    assert problem is not None and problem.startswith(f"rank 2 (pid {os.getpid()} on {OTHER}) stopped responding")


def test_dead_process_on_this_host_is_named_at_once(store):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    judge = dog(store, timeout=60)
    beat(store, 1, judge.host, 0, pid=gone.pid)
    assert judge.dead_rank() == f"rank 1 (pid {gone.pid} on {judge.host}) died"


def test_finished_peer_is_not_dead(store):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    judge = dog(store)
    beat(store, 1, judge.host, 0, pid=gone.pid, done=True)  # finished, then its process ended
    for n in range(6):
        beat(store, 2, OTHER, n)
        beat(store, 3, OTHER, n)
        assert judge.dead_rank() is None
        time.sleep(TIMEOUT / 2)


def test_every_rank_reads_the_verdict_and_acknowledges_it(store):
    reader = dog(store, rank=2)
    assert reader.dead_rank() is None  # no verdict yet, within the timeout
    verdict(store, 1, problem="node vnode1 (ranks 2-3) lost: no heartbeat for 5s")
    assert reader.dead_rank() == "node vnode1 (ranks 2-3) lost: no heartbeat for 5s"
    assert store.add("ack", 0) == 1


def test_a_verdict_that_stops_changing_names_the_judges_node(store):
    reader = dog(store, rank=2)
    store.set(f"node/{OTHER}", json.dumps({"0": 1, "1": 1}))
    store.set(f"node/{reader.host}", json.dumps({"2": os.getpid(), "3": os.getpid()}))
    for n in range(3):
        verdict(store, n)
        assert reader.dead_rank() is None
        time.sleep(TIMEOUT / 2)
    time.sleep(TIMEOUT)
    problem = reader.dead_rank()
    assert problem is not None and problem.startswith(f"node {OTHER} (ranks 0-1) lost: no heartbeat for "), problem


def test_a_finished_judge_is_not_lost(store):
    reader = dog(store, rank=2)
    verdict(store, 1, done=True)
    reader.dead_rank()
    time.sleep(2 * TIMEOUT)
    assert reader.dead_rank() is None


def test_a_store_that_stops_answering_names_the_masters_node(tmp_path):
    """The store lives in another process (rank 0's, or torchrun's agent): once it is gone, each
    rank names the judge's node after the timeout, and not before."""
    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, "-c", "import sys, time, torch.distributed as d\n"
                               "s = d.TCPStore('127.0.0.1', 0, 1, True, wait_for_workers=False)\n"
                               f"open({str(port_file)!r}, 'w').write(str(s.port)); time.sleep(600)"])
    try:
        while not (port_file.exists() and port_file.read_text()):
            assert server.poll() is None
            time.sleep(0.05)
        port = int(port_file.read_text())
        master = dist.PrefixStore("t", dist.TCPStore("127.0.0.1", port, 1, False, wait_for_workers=False))
        reader = Watchdog(2, 4, 1.0, interval_s=0.05, connect=client("127.0.0.1", port), store_name=f"x:{port}")
        master.set(f"node/{OTHER}", json.dumps({"0": 1, "1": 1}))
        verdict(master, 1)
        assert reader.dead_rank() is None
        server.kill()
        server.wait()
        killed = time.monotonic()
        problem = None
        while problem is None and time.monotonic() - killed < 5:
            problem = reader.dead_rank()
            time.sleep(0.1)
        waited = time.monotonic() - killed
        assert problem.startswith(f"node {OTHER} (ranks 0-1) lost: the rendezvous store at x:{port} has not answered "
                                  "for "), problem
        assert 1.0 <= waited < 4.0, waited
    finally:
        server.kill()


def test_a_local_death_seen_by_a_reader_reaches_every_rank(store):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    judge, reader = dog(store, rank=0, world=3), dog(store, rank=1, world=3)
    store.set(f"node/{reader.host}", json.dumps({"1": os.getpid(), "2": gone.pid}))
    beat(store, 2, reader.host, 0, pid=gone.pid)
    verdict(store, 1, host=OTHER)
    line = f"rank 2 (pid {gone.pid} on {reader.host}) died"
    assert reader.dead_rank() == line
    judge.host = OTHER  # the judge on another node learns it from the store, not from the pid
    assert judge.dead_rank() == line


def test_each_watchdog_has_its_own_namespace(store):
    """A verdict left by an earlier watchdog (an earlier launch on a reused store) is not this one's."""
    verdict(store, 1, problem="rank 1 (pid 1 on x) died")
    assert dog(store, rank=2, prefix="u").dead_rank() is None


def test_the_store_is_the_process_groups_own_over_a_new_connection(tmp_path):
    script = (
        "import torch.distributed as d\n"
        "from megallama.train.watchdog import default_store_connect\n"
        "d.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "(a, name), (b, _) = default_store_connect(1.0), default_store_connect(1.0)\n"
        "a().set('k', 'v')\n"
        "print(name.startswith('127.0.0.1:'), b().check(['k']), a().get('k') == b'v')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.split() == ["True", "False", "True"], out.stderr[-2000:]


def test_a_request_that_never_returns_is_given_up():
    """Over a cut link a TCPStore ``get`` waits for its reply forever: the watchdog abandons it,
    makes no new request while it hangs, and judges the store on the clock."""
    release = threading.Event()

    class Silent:
        def __getattr__(self, name):
            return lambda *args: release.wait()

    reader = Watchdog(2, 4, 1.0, interval_s=0.05, connect=Silent, store_name="x:1")
    try:
        began = time.monotonic()
        assert reader.dead_rank() is None
        assert time.monotonic() - began < reader.op_timeout + 2
        time.sleep(1.1)
        began = time.monotonic()
        assert reader.dead_rank().startswith("rank 0 lost: the rendezvous store at x:1 has not answered for ")
        assert time.monotonic() - began < 0.5  # the stuck request is not repeated
    finally:
        release.set()
