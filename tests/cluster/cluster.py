"""``VirtualCluster``: 2-3 nodes on one machine, each with its own IP, hostname, /etc/hosts and,
when asked, a node-local directory the other nodes cannot see.

A node's processes run under ``ip netns exec NS unshare --uts --mount``: the netns gives the IP,
the UTS namespace the hostname, the private mount namespace the bind mounts (/etc/hosts naming
every node, the node-local directory), so nothing of the host's own configuration is modified and
the mounts vanish with the node's last process. Everything is torn down on ``close`` (also at
interpreter exit, and by the next cluster if this process crashed).
"""
from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.cluster import netns
from tests.cluster.sshd import SshSetup, unavailable_reason as ssh_unavailable


class ClusterUnavailable(RuntimeError):
    """Namespaces (or the tools the cluster needs) cannot be had here; the message says why."""


_REASON: Dict[str, Optional[str]] = {}


def unavailable_reason(ssh: bool = False) -> Optional[str]:
    """One line saying why no virtual cluster can be made here, or None (probed once per process)."""
    if "ns" not in _REASON:
        _REASON["ns"] = _probe_namespaces()
    return _REASON["ns"] or (ssh_unavailable() if ssh else None)


def _probe_namespaces() -> Optional[str]:
    if os.geteuid() != 0:
        return "virtual cluster needs root (network, UTS and mount namespaces)"
    missing = [b for b in ("ip", "unshare", "mount", "hostname") if not shutil.which(b)]
    if missing:
        return f"virtual cluster needs {', '.join(missing)} (iproute2, util-linux)"
    probe = f"{netns.PREFIX}probe{os.getpid()}"
    try:
        netns.ip("netns", "add", probe)
        out = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "--propagation", "private",
                              "hostname", "vprobe"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return f"virtual cluster: unshare --uts --mount failed: {out.stderr.strip()}"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"virtual cluster: cannot make a network namespace: {exc}"
    finally:
        netns.ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    ip: str
    ns: str


class VirtualCluster:
    """``with VirtualCluster(n=2, local_dir=Path) as c: c.popen(0, argv)``; node i is ``vnode{i+1}``."""

    def __init__(self, n: int = 2, local_dir: Optional[Path] = None):
        if not 1 <= n <= 8:
            raise ValueError(f"n: 1..8 nodes, got {n}")
        self.n, self.local_dir = n, Path(local_dir).resolve() if local_dir else None
        self.nodes: List[Node] = []
        self.tmp: Optional[Path] = None
        self.ssh: Optional[SshSetup] = None
        self._net: Optional[netns.Network] = None
        self._subnet: Optional[int] = None
        self._procs: List[subprocess.Popen] = []
        self._made_local = False

    def __enter__(self) -> "VirtualCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- set-up and teardown -------------------------------------------------------------------
    def start(self) -> "VirtualCluster":
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{netns.PREFIX}-"))
        atexit.register(self.close)
        try:
            self._subnet = netns.claim_subnet(self.tmp)
            self._net = netns.Network(self._subnet, self.n)
            self.nodes = [Node(i, f"vnode{i + 1}", self._net.ip_of(i), self._net.nodes[i]) for i in range(self.n)]
            self._net.create()
            self._write_node_files()
        except BaseException:
            self.close()
            raise
        return self

    def _write_node_files(self) -> None:
        hosts = self.tmp / "hosts"
        hosts.write_text("127.0.0.1 localhost\n::1 localhost\n"
                         + "".join(f"{node.ip} {node.name}\n" for node in self.nodes))
        self.shared_dir.mkdir()
        if self.local_dir and not self.local_dir.exists():
            self.local_dir.mkdir(parents=True)
            self._made_local = True
        for node in self.nodes:
            lines = ["#!/bin/sh", "set -e", f"hostname {node.name}", f"mount --bind {hosts} /etc/hosts"]
            if self.local_dir:
                self.node_local(node.index).mkdir()
                lines.append(f"mount --bind {self.node_local(node.index)} {shlex.quote(str(self.local_dir))}")
            lines += ['cd "$1"', "shift", 'exec "$@"', ""]
            (self.tmp / f"enter{node.index}.sh").write_text("\n".join(lines))

    def close(self) -> None:
        """Kill every process, remove the namespaces (and with them the veths) and the temp dir."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        if self._net is not None:
            self._net.destroy()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs = []
        if self._subnet is not None:
            netns.release_subnet(self._subnet)
            self._subnet = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._made_local:
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self._made_local = False
        self._net = None
        atexit.unregister(self.close)

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def shared_dir(self) -> Path:
        """A directory every node sees at the same path (the host's filesystem)."""
        return self.tmp / "shared"

    def node_local(self, i: int) -> Path:
        """The host path behind node i's ``local_dir`` (for inspecting what it wrote)."""
        return self.tmp / f"local{i}"

    @property
    def slurm_nodelist(self) -> str:
        return f"vnode[1-{self.n}]" if self.n > 1 else "vnode1"

    def hostfile(self, slots: int) -> Path:
        """A DeepSpeed-style hostfile (``vnodeN slots=K``) naming every node."""
        path = self.tmp / "hostfile"
        path.write_text("".join(f"{node.name} slots={slots}\n" for node in self.nodes))
        return path

    # ---- processes -----------------------------------------------------------------------------
    def wrap(self, i: int, argv: Sequence[str], cwd: Optional[Path] = None) -> List[str]:
        """``argv`` as a command line that runs it inside node i, in ``cwd`` (default: ours)."""
        node = self.nodes[i]
        return ["ip", "netns", "exec", node.ns, "unshare", "--uts", "--mount", "--propagation", "private",
                "/bin/sh", str(self.tmp / f"enter{i}.sh"), str(cwd or os.getcwd()), *map(str, argv)]

    def popen(self, i: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.wrap(i, argv, cwd), env=env, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
            timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.wrap(i, argv, cwd), env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{self.nodes[i].name}: {' '.join(map(str, argv))} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        return proc

    def pids(self, i: int) -> List[int]:
        return netns.ns_pids(self.nodes[i].ns)

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of node i (its sshd included), as if it lost power."""
        netns.kill_ns_processes(self.nodes[i].ns)

    def link_down(self, i: int) -> None:
        """Pull node i's cable: its veth at the hub goes down, its processes live on."""
        self._net.set_link(i, up=False)

    def link_up(self, i: int) -> None:
        self._net.set_link(i, up=True)

    # ---- ssh -----------------------------------------------------------------------------------
    def start_sshd(self, nodes: Optional[Sequence[int]] = None, wait_s: float = 20.0) -> SshSetup:
        """An sshd in every node (or ``nodes``) with this cluster's keys; returns once each answers."""
        reason = ssh_unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        if self.ssh is None:
            self.ssh = SshSetup(self.tmp / "ssh", [(node.name, node.ip) for node in self.nodes])
            self.ssh.write()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        todo = list(range(self.n) if nodes is None else nodes)
        for i in todo:
            log = open(self.ssh.root / f"sshd{i}.log", "ab")
            self.popen(i, self.ssh.sshd_argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        deadline = time.monotonic() + wait_s
        for i in todo:
            name = self.nodes[i].name
            while True:
                out = self.run(i, self.ssh.ssh_argv(name, "hostname"), check=False, timeout=30)
                if out.returncode == 0 and out.stdout.strip() == name:
                    break
                if time.monotonic() > deadline:
                    log = (self.ssh.root / f"sshd{i}.log").read_text()[-2000:]
                    raise RuntimeError(f"sshd on {name} does not answer: {out.stderr.strip()} {log}")
                time.sleep(0.2)
        return self.ssh

    def ssh_env(self) -> Dict[str, str]:
        """Environment for pdsh (and DeepSpeed's pdsh runner) to reach the nodes with our keys."""
        if self.ssh is None:
            raise RuntimeError("start_sshd() first")
        return self.ssh.client_env()
