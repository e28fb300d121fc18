"""A dead or stuck rank never hangs the job.

Every rank's daemon thread touches ``RUN_DIR/.heartbeat/rankN`` each second and reads the
others'. A rank whose process is gone (same host) or whose heartbeat has not changed for
``train.heartbeat_timeout_s`` (judged by this host's clock, so clock skew between nodes does not
matter) is named in one log line and this process exits non-zero, even if its main thread is
blocked inside a collective that would otherwise wait forever.

A peer that never wrote a heartbeat is declared dead only where it should be visible: on one node,
or once a heartbeat from another host shows the run directory is shared. With a node-local run
directory the peers on other nodes stay unjudged here; the process-group timeout
(``train.dist_timeout_s``) still bounds a wait on them.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
EXIT_CODE = 3


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


def local_world_size(env=None) -> Optional[int]:
    """Ranks on this node, as the launcher tells it (torchrun, deepspeed, Open MPI, MPICH, Slurm)."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if env.get("SLURM_JOB_NUM_NODES") == "1" and env.get("SLURM_NTASKS", "").isdigit():
        return int(env["SLURM_NTASKS"])
    return None


class Watchdog:
    def __init__(self, run_dir: str, rank: int, world: int, timeout_s: float, interval_s: float = 1.0):
        self.dir = Path(run_dir) / ".heartbeat"
        self.rank, self.world, self.timeout, self.interval = rank, world, timeout_s, interval_s
        self.launch = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:" \
                      f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.started = time.monotonic()
        self.single_node = local_world_size() == world
        self._changed = {}  # rank -> (its last heartbeat stamp, our monotonic time when it changed)

    def start(self) -> "Watchdog":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="megallama-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:  # a finished rank is not a dead one
            (self.dir / f"rank{self.rank}").write_text(json.dumps({"launch": self.launch, "done": True}))
        except OSError:
            pass

    def _beat(self) -> None:
        tmp = self.dir / f".rank{self.rank}.tmp"
        tmp.write_text(json.dumps({"launch": self.launch, "pid": os.getpid(), "host": self.host, "t": time.time()}))
        os.replace(tmp, self.dir / f"rank{self.rank}")

    def _read(self, r: int) -> Optional[dict]:
        try:
            hb = json.loads((self.dir / f"rank{r}").read_text())
        except (OSError, ValueError):
            return None
        return hb if isinstance(hb, dict) and hb.get("launch") == self.launch else None

    def dead_rank(self) -> Optional[str]:
        """A one-line description of the first failed peer, or None."""
        now = time.monotonic()
        beats = {r: self._read(r) for r in range(self.world) if r != self.rank}
        shared = self.single_node or any(hb and hb.get("host", self.host) != self.host for hb in beats.values())
        for r, hb in beats.items():
            if hb is None:
                if shared and now - self.started > self.timeout:
                    return f"rank {r} never reported a heartbeat within {self.timeout:.0f}s"
                continue
            if hb.get("done"):
                continue
            if hb["host"] == self.host and not _alive(hb["pid"]):
                return f"rank {r} (pid {hb['pid']} on {hb['host']}) died"
            stamp, since = self._changed.get(r, (None, now))
            if hb["t"] != stamp:
                self._changed[r] = (hb["t"], now)
            elif now - since > self.timeout:
                return f"rank {r} (pid {hb['pid']} on {hb['host']}) stopped responding {now - since:.0f}s ago"
        return None

    def wait_for_dead_rank(self) -> Optional[str]:
        """After a failed collective: give the heartbeats up to the timeout to name the culprit."""
        deadline = time.monotonic() + self.timeout + 2 * self.interval
        while time.monotonic() < deadline:
            problem = self.dead_rank()
            if problem:
                return problem
            time.sleep(self.interval)
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                problem = self.dead_rank()
            except OSError:
                continue
            if problem:
                sys.stderr.write(f"megallama train: error: {problem}; rank {self.rank} exits instead of waiting\n")
                sys.stderr.flush()
                os._exit(EXIT_CODE)
