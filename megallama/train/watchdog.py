"""A dead or stuck rank, or a lost node, never hangs the job.

Liveness goes through the rendezvous store the process group was started with (the TCPStore of
``env://`` under deepspeed, mpiexec and srun, torchrun's agent store), never through the run
directory: every rank reading every other rank's heartbeat file each second was N² file opens per
second on a shared filesystem (4M/s at 2048 ranks; ``benchmarks/heartbeat_ops.py``). Per interval:

* every rank sets its own key ``hb/RANK`` (host, pid, a counter): N sets;
* one judge, global rank 0 (its node usually hosts the store, so its reads stay local), reads them
  all with one ``multi_get`` and publishes ``verdict``: N gets;
* every other rank reads ``verdict``: N gets. 3N key operations in total, O(N).

The judge names a rank whose counter has not changed for ``train.heartbeat_timeout_s`` (by its own
monotonic clock, so skewed host clocks do not matter), and a whole node when all of that host's
ranks fell silent together: "node vnode1 (ranks 2-3) lost: no heartbeat for 5s". Every rank judges
the judge: a verdict that stops changing names the judge's node, and a store that stops answering
names the master's node, whichever the launcher (deepspeed/srun/mpiexec host the store in rank 0's
process, torchrun in the agent of the node with rank 0). Same-host peers that died are seen at once
by their pid (the judge publishes each node's rank->pid map once), without a store round trip;
such a finding is reported to the judge (key ``problem``) so every rank exits with the same line.

The watchdog opens its own client connection to that store rather than sharing the process
group's (a TCPStore client serialises requests, so a main thread waiting in the store would block
the watchdog behind it), and gives up each request after a short timeout even where TCPStore would
wait forever (a ``get`` over a cut link); a timed-out connection is dropped, never reused. A
connection refused or reset means the store's process is gone: no more attempts, only the clock.
A finished rank marks its key done, so leaving is not dying.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import socket
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from megallama.native_calls import native_call

EXIT_CODE = 3
_generation = itertools.count()  # one namespace per watchdog: ranks create theirs in the same order


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def rank_list(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, ranks = [], sorted(ranks)
    for _, run in itertools.groupby(enumerate(ranks), lambda ir: ir[1] - ir[0]):
        run = [r for _, r in run]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def node_lost(host: str, ranks: Iterable[int], why: str) -> str:
    ranks = sorted(ranks)
    return f"node {host} ({'rank' if len(ranks) == 1 else 'ranks'} {rank_list(ranks)}) lost: {why}"


def default_store_connect(timeout_s: float) -> Tuple[Callable[[], object], str]:
    """A function opening a fresh client of the default process group's store (its own socket),
    in a namespace of its own, and the store's address for messages."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    base = _get_default_store()
    while isinstance(base, dist.PrefixStore):
        base = base.underlying_store
    launch = f"megallama/watchdog/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
             f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}/{next(_generation)}/"
    timeout = datetime.timedelta(seconds=timeout_s)

    def connect():
        if isinstance(base, dist.TCPStore):
            client = dist.TCPStore(base.host, base.port, is_master=False, wait_for_workers=False, timeout=timeout,
                                   use_libuv=base.libuvBackend)
        else:  # an in-process store (tests): a clone shares it
            client = base.clone()
            client.set_timeout(timeout)
        return dist.PrefixStore(launch, client)

    return connect, f"{base.host}:{base.port}" if isinstance(base, dist.TCPStore) else type(base).__name__


class Watchdog:
    def __init__(self, rank: int, world: int, timeout_s: float, interval_s: float = 1.0,
                 connect: Optional[Callable[[], object]] = None, store_name: str = ""):
        self.rank, self.world, self.timeout, self.interval = rank, world, timeout_s, interval_s
        self.op_timeout = max(0.5, min(timeout_s / 4, 5.0))  # one unanswered request costs at most this
        self.grace_s = 5.0  # for a process that is exiting on a failure to finish doing so
        if connect is None:
            connect, store_name = default_store_connect(self.op_timeout)
        self._connect, self.store_name = connect, store_name
        self.host, self.pid, self.judge = socket.gethostname(), os.getpid(), rank == 0
        self.started = time.monotonic()
        self.n = 0  # our heartbeat counter
        self.problem: Optional[str] = None
        self._store, self._store_gone, self._stuck = None, False, None
        self._unanswered_since: Optional[float] = None
        self._changed: Dict[int, tuple] = {}  # rank -> (its last counter, our monotonic time it changed)
        self._beats: Dict[int, dict] = {}  # judge: the latest payload of every rank that reported
        self._reported: Optional[str] = None  # judge: a failure another rank saw ("" for none)
        self._verdict: Optional[dict] = None  # reader: the latest verdict and our time it changed
        self._verdict_since = self.started
        self._nodes: Dict[str, Dict[int, int]] = {}  # host -> {rank: pid} (a reader: its own and the judge's)
        self._stop, self._found = threading.Event(), threading.Event()
        self._main_waiting = False
        self._thread: Optional[threading.Thread] = None

    # -- the store, over one connection that is replaced after any failure
    def _op(self, name: str, *args):
        """One request, given up after ``op_timeout``: with a peer's link cut, some TCPStore requests
        (``get``) wait for the reply without any timeout, so each runs in a helper thread of its own.
        While an abandoned one is still stuck, no new request is made (one stuck thread at most)."""
        if self._store_gone:
            raise ConnectionError("the rendezvous store is gone")
        if self._stuck is not None and self._stuck.is_alive():
            raise TimeoutError("an earlier store request is still unanswered")
        box: list = []

        def request():
            try:
                with native_call():  # abandoned on a timeout: it may still be out when the process ends
                    if self._store is None:
                        self._store = self._connect()
                    box.append((True, getattr(self._store, name)(*args)))
            except Exception as exc:
                box.append((False, exc))

        helper = threading.Thread(target=request, name="megallama-watchdog-request", daemon=True)
        helper.start()
        helper.join(self.op_timeout + 1)
        if not box:
            self._stuck = helper
            raise TimeoutError(f"the rendezvous store did not answer {name} within {self.op_timeout + 1:.1f}s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _failed(self, exc: Exception) -> None:
        """A refused, reset or broken connection means the store's process is gone for good (no
        more attempts, each of which would print c10d's traceback); no answer in time may be a
        stall, so the connection (whose next reply might be this one's) is replaced."""
        self._store = None
        text = str(exc).lower()
        if any(word in text for word in ("refused", "reset", "broken pipe", "gone")):
            self._store_gone = True

    def _beat(self, done: bool = False) -> None:
        self.n += 1
        self._op("set", f"hb/{self.rank}", json.dumps({"host": self.host, "pid": self.pid, "n": self.n,
                                                        "done": done}))

    def start(self) -> "Watchdog":
        self._round()
        self._thread = threading.Thread(target=self._run, name="megallama-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, finished: bool = True) -> None:
        """``finished``: this rank completed (a finished rank is not a dead one); a rank that fails
        leaves its heartbeat to go stale so its peers notice."""
        self._stop.set()
        if self.problem:  # the thread ends the process if what follows hangs
            return
        if self._thread is not None:
            self._thread.join(timeout=self.op_timeout + 5)
        if not finished:
            return
        try:
            self._beat(done=True)
            if self.judge:
                self._op("set", "verdict", json.dumps({"n": self.n, "host": self.host, "done": True}))
        except Exception:  # the store gone at the end of a run: nothing left to tell
            pass

    def dead_rank(self) -> Optional[str]:
        """One heartbeat round: a one-line description of a failed peer or node, or None. A rank
        that found one tells the judge it knows (the judge may take the store with it when it exits)."""
        problem = self._round()
        if problem and not self.judge:
            try:
                self._op("add", "ack", 1)
            except Exception:
                pass
        return problem

    def _round(self) -> Optional[str]:
        now = time.monotonic()
        try:
            self._beat()
            problem = self._judge_all(now) if self.judge else self._read_verdict(now)
            self._unanswered_since = None
        except Exception as exc:  # judged on the clock: the timeout, as for any silent peer
            self._failed(exc)
            self._unanswered_since = self._unanswered_since or now
            problem = None
            if self._verdict and self._verdict.get("done"):
                return None
            if now - self._unanswered_since > self.timeout:
                problem = self._master_lost(now - self._unanswered_since)
        return problem or self._local_death()

    # -- the judge
    def _judge_all(self, now: float) -> Optional[str]:
        unseen = [r for r in range(self.world) if r not in self._beats]
        if unseen and not self._op("check", [f"hb/{r}" for r in unseen]):  # start-up: which are there yet
            unseen = [r for r in unseen if self._op("check", [f"hb/{r}"])]
        found = sorted(set(self._beats) | set(unseen))
        missing = [r for r in range(self.world) if r not in found]
        if self._reported is None:
            self._op("compare_set", "problem", "", "")  # creates it empty, keeps a report made before
        values = self._op("multi_get", [f"hb/{r}" for r in found] + ["problem"])
        self._beats.update({r: json.loads(v) for r, v in zip(found, values)})
        self._reported = values[-1].decode()
        for r in found:
            if self._beats[r]["n"] != self._changed.get(r, (None,))[0]:
                self._changed[r] = (self._beats[r]["n"], now)
        if not missing and not self._nodes:
            for host, ranks in self._by_host().items():
                self._op("set", f"node/{host}", json.dumps({r: self._beats[r]["pid"] for r in ranks}))
            self._nodes = {h: {r: self._beats[r]["pid"] for r in ranks} for h, ranks in self._by_host().items()}
        problem = self._reported or self._verdict_on(missing, now)
        if problem and not self._reported:  # the first report wins, ours or a peer's made meanwhile
            problem = self._op("compare_set", "problem", "", problem).decode() or problem
        self._op("set", "verdict", json.dumps({"n": self.n, "host": self.host, "problem": problem}))
        if problem:
            self._await_acks(now)
        return problem

    def _by_host(self) -> Dict[str, List[int]]:
        hosts: Dict[str, List[int]] = {}
        for r in range(self.world):
            if r in self._beats:
                hosts.setdefault(self._beats[r]["host"], []).append(r)
        return hosts

    def _verdict_on(self, missing: List[int], now: float) -> Optional[str]:
        for r in range(self.world):
            hb = self._beats.get(r)
            if r != self.rank and hb and not hb["done"] and hb["host"] == self.host and not _alive(hb["pid"]):
                return f"rank {r} (pid {hb['pid']} on {hb['host']}) died"
        if missing and now - self.started > self.timeout:
            return f"{'rank' if len(missing) == 1 else 'ranks'} {rank_list(missing)} never reported a heartbeat " \
                   f"within {self.timeout:.0f}s"
        silent = {r: now - self._changed[r][1] for r in range(self.world)
                  if r != self.rank and r in self._beats and not self._beats[r]["done"]}
        stale = [r for r, s in silent.items() if s > self.timeout]
        if not stale:
            return None
        r = stale[0]
        host = self._beats[r]["host"]
        on_host = self._by_host()[host]
        quiet = min(self.timeout, 3 * self.interval)  # silent together: the node went, not one rank
        if host != self.host and all(silent.get(q, quiet + 1) > quiet for q in on_host if q in silent):
            return node_lost(host, on_host, f"no heartbeat for {max(silent[q] for q in on_host if q in silent):.0f}s")
        return f"rank {r} (pid {self._beats[r]['pid']} on {host}) stopped responding {silent[r]:.0f}s ago"

    def _await_acks(self, now: float) -> None:
        """The store may live in this process: give the others up to a few intervals to read the
        verdict before this rank exits and takes the store with it."""
        expected = sum(1 for r, (_, since) in self._changed.items()
                       if r != self.rank and not self._beats[r]["done"] and now - since < 2 * self.interval + 1
                       and (self._beats[r]["host"] != self.host or _alive(self._beats[r]["pid"])))
        deadline = time.monotonic() + 3 * self.interval
        while time.monotonic() < deadline and self._op("add", "ack", 0) < expected:
            time.sleep(self.interval / 10)

    # -- every other rank
    def _read_verdict(self, now: float) -> Optional[str]:
        if self._verdict is None and not self._op("check", ["verdict"]):
            if now - self.started > self.timeout:
                return f"rank 0 never reported a heartbeat within {self.timeout:.0f}s"
            return None
        verdict = json.loads(self._op("get", "verdict"))
        if self._verdict is None or verdict["n"] != self._verdict["n"]:
            self._verdict, self._verdict_since = verdict, now
        if verdict.get("done"):
            return None
        if verdict.get("problem"):
            return verdict["problem"]
        for host in {self.host, verdict["host"]} - set(self._nodes):  # once, when the judge has published them
            if self._op("check", [f"node/{host}"]):
                self._nodes[host] = {int(r): pid for r, pid in json.loads(self._op("get", f"node/{host}")).items()}
        if now - self._verdict_since > self.timeout:
            return self._judge_lost(f"no heartbeat for {now - self._verdict_since:.0f}s")
        return None

    def _judge_lost(self, why: str) -> str:
        host = (self._verdict or {}).get("host")
        if host is None:
            return f"rank 0 lost: {why}"
        return node_lost(host, self._nodes.get(host, {0: 0}), why)

    def _master_lost(self, silent_s: float) -> str:
        why = f"the rendezvous store at {self.store_name} has not answered for {silent_s:.0f}s"
        if self.judge:
            return f"the node hosting the rendezvous store lost: {why}"
        return self._judge_lost(why)

    def _local_death(self) -> Optional[str]:
        """A same-host peer whose process is gone (not finished): no need to wait for the timeout."""
        for r, pid in self._nodes.get(self.host, {}).items():
            if r == self.rank or _alive(pid):
                continue
            line = f"rank {r} (pid {pid} on {self.host}) died"
            try:
                if json.loads(self._op("get", f"hb/{r}")).get("done"):
                    continue
                # the first report wins: a peer that exited because of it is not the culprit
                return self._op("compare_set", "problem", "", line).decode() or line
            except Exception:
                return line
        return None

    # -- the thread
    def wait_for_dead_rank(self) -> Optional[str]:
        """After a failed collective: give the heartbeats up to the timeout to name the culprit."""
        self._main_waiting = True
        self._found.wait(self.timeout + 2 * self.interval + 2 * self.op_timeout)
        return self.problem

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self.dead_rank()
            if problem:
                break
        else:
            return
        self.problem = problem
        self._found.set()
        if self._main_waiting:  # the main thread reports it, with the collective's own error
            time.sleep(self.grace_s)  # and the process ends; if its teardown hangs, it ends here
        else:
            sys.stderr.write(f"megallama train: error: {problem}; rank {self.rank} exits instead of waiting\n")
            sys.stderr.flush()
        os._exit(EXIT_CODE)
