"""One bounded ssh call per host learns everything the checks need about it (a call per check
would multiply the connection cost); this host is read directly."""
from __future__ import annotations

import os
import shlex
import sys
from typing import List, Optional

from megallama.doctor.model import Facts, Setup
from megallama.doctor.system import System

CONNECT_TIMEOUT_S = 5
PROBE_TIMEOUT_S = 30  # connect, plus nvidia-smi's own 15 s bound, plus the port test's 3 s
MARK = "MEGALLAMA_DOCTOR_PROBE"


def ssh_argv(host: str, remote: str, env) -> List[str]:
    """How pdsh's ssh would connect (``PDSH_SSH_ARGS_APPEND`` and ~/.ssh/config apply), but never
    asking for a password and never waiting long for a dead host."""
    extra = shlex.split(env.get("PDSH_SSH_ARGS_APPEND", ""))
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}", *extra, host, remote]


def remote_script(setup: Setup, token: Optional[str], port_test: bool) -> str:
    q = shlex.quote
    lines = [
        f"echo {MARK}",
        f"test -x {q(sys.executable)} && echo python=1 || echo python=0",
        f"test -d {q(os.getcwd())} && echo cwd=1 || echo cwd=0",
        't=; command -v timeout >/dev/null 2>&1 && t="timeout 15"',
        "if command -v nvidia-smi >/dev/null 2>&1; then "
        "if out=$($t nvidia-smi -L 2>/dev/null); then echo gpus=$(printf '%s\\n' \"$out\" | grep -c '^GPU '); "
        "else echo gpus=error; fi; else echo gpus=cpu; fi",
        "echo ifaces=$(ls /sys/class/net 2>/dev/null | tr '\\n' ' ')",
        "echo hostaddr=$(getent hosts \"$(hostname)\" 2>/dev/null | awk '{print $1; exit}')",
    ]
    if token:
        lines.append(f"test -f {q(token)} && echo shared=1 || echo shared=0")
    if port_test:
        code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()"
        lines.append(f"P={q(sys.executable)}; test -x \"$P\" || P=python3; "
                     f"\"$P\" -c {q(code)} {q(setup.master_addr)} {setup.master_port} >/dev/null 2>&1 "
                     "&& echo port=1 || echo port=0")
    return "sh -c " + q("; ".join(lines))


def parse_probe(rc: int, out: str, err: str) -> Facts:
    if MARK not in out.splitlines():
        last = [x.strip() for x in err.splitlines() if x.strip()]
        return Facts(reached=False, error=last[-1] if last else f"ssh exited with {rc}")
    kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    flag = {"1": True, "0": False}
    return Facts(reached=True, python=flag.get(kv.get("python")), cwd=flag.get(kv.get("cwd")),
                 gpus=kv.get("gpus") or None, shared=flag.get(kv.get("shared")), port_open=flag.get(kv.get("port")),
                 interfaces=kv["ifaces"].split() if "ifaces" in kv else None,
                 hostname_addr=kv.get("hostaddr") or None)


def probe_remote(system: System, setup: Setup, host: str, token: Optional[str], port_test: bool) -> Facts:
    rc, out, err = system.run(ssh_argv(host, remote_script(setup, token, port_test), setup.env),
                              timeout=PROBE_TIMEOUT_S)
    return parse_probe(rc, out, err)


def probe_here(system: System) -> Facts:
    """This host, read without ssh (a one-host hostfile launches here, as DeepSpeed does)."""
    addrs = system.resolve(system.hostname()) or []
    return Facts(reached=True, python=True, cwd=True, gpus=system.local_gpus(), shared=True,
                 interfaces=sorted(system.interfaces()), hostname_addr=addrs[0] if addrs else None)
