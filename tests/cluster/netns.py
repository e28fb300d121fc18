"""Network namespaces for the virtual cluster: a hub namespace holding a bridge, one namespace per
node joined to it by a veth pair (``eth0`` inside every node, so one GLOO_SOCKET_IFNAME fits all).

Nothing is created in the host's own namespace, so test traffic never touches its interfaces. Each
cluster takes a free subnet 10.213.X.0/24 under a lock and records its owner (pid and start time)
in /run, so a cluster left by a crashed run is recognised and removed by the next one while a
live cluster of a concurrent test session is left alone.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

PREFIX = "mlvc"
REGISTRY = Path("/run/megallama-vcluster")
SUBNETS = range(1, 255)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def namespaces() -> List[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ns_pids(ns: str) -> List[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_ns_processes(ns: str, wait_s: float = 10.0) -> None:
    """SIGKILL every process in ``ns`` until none is left (a fork racing the kill is caught next round)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {ns} survive SIGKILL")
        time.sleep(0.05)


def delete_ns(ns: str) -> None:
    kill_ns_processes(ns)
    ip("netns", "del", ns, check=False)


def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _owner_alive(owner: Path) -> bool:
    try:
        rec = json.loads(owner.read_text())
    except (OSError, ValueError):
        return False
    return _start_time(rec["pid"]) == rec["start"]


def _remove_cluster(subnet: int) -> None:
    for ns in namespaces():
        if ns.startswith(f"{PREFIX}{subnet}-"):
            delete_ns(ns)
    owner = REGISTRY / f"{subnet}.owner"
    try:
        tmp = json.loads(owner.read_text()).get("tmp")
        if tmp and Path(tmp).name.startswith(PREFIX):
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, ValueError):
        pass
    owner.unlink(missing_ok=True)


def _clean_stale() -> None:
    """Called under the lock: every cluster whose owner process is gone is a crashed run's debris."""
    subnets = {int(ns[len(PREFIX):].split("-")[0]) for ns in namespaces()
               if ns.startswith(PREFIX) and ns[len(PREFIX):].split("-")[0].isdigit()}
    subnets |= {int(p.stem) for p in REGISTRY.glob("*.owner") if p.stem.isdigit()}
    for subnet in subnets:
        if not _owner_alive(REGISTRY / f"{subnet}.owner"):
            _remove_cluster(subnet)


def claim_subnet(tmp: Path) -> int:
    """A subnet no live cluster uses, recorded as ours (the stale ones are removed first)."""
    with _registry_lock():
        _clean_stale()
        for subnet in SUBNETS:
            owner = REGISTRY / f"{subnet}.owner"
            if not owner.exists():
                pid = os.getpid()
                owner.write_text(json.dumps({"pid": pid, "start": _start_time(pid), "tmp": str(tmp)}))
                return subnet
    raise RuntimeError(f"no free virtual-cluster subnet: {len(SUBNETS)} clusters alive")


def release_subnet(subnet: int) -> None:
    with _registry_lock():
        _remove_cluster(subnet)


class Network:
    """The hub bridge and one veth per node; ``link_down`` pulls a node's cable at the hub side."""

    def __init__(self, subnet: int, n: int):
        self.subnet, self.n = subnet, n
        self.hub = f"{PREFIX}{subnet}-hub"
        self.nodes = [f"{PREFIX}{subnet}-n{i}" for i in range(n)]

    def ip_of(self, i: int) -> str:
        return f"10.213.{self.subnet}.{i + 1}"

    def hub_port(self, i: int) -> str:
        return f"vc{self.subnet}n{i}"

    def create(self) -> None:
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        ip("-n", self.hub, "link", "set", "lo", "up")
        for i, ns in enumerate(self.nodes):
            ip("netns", "add", ns)
            ip("-n", self.hub, "link", "add", self.hub_port(i), "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.hub, "link", "set", self.hub_port(i), "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.ip_of(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def set_link(self, i: int, up: bool) -> None:
        ip("-n", self.hub, "link", "set", self.hub_port(i), "up" if up else "down")

    def destroy(self) -> None:
        for ns in self.nodes + [self.hub]:
            if ns in namespaces():
                delete_ns(ns)
