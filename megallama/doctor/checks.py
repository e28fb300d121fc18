"""The checks: each reads the setup and what was learnt, and returns one result whose problems
are one line each, naming what is wrong and the fix. Nothing here touches the network."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megallama.doctor.model import CheckResult, Facts, Problem, Setup
from megallama.doctor.system import is_loopback

PACKAGES = {"ssh": "openssh-client", "pdsh": "pdsh"}
SHARE_FIX = "put the run directory on a filesystem every node mounts, or set checkpoint.storage: node_local"


@dataclass
class Findings:
    """What the doctor learnt before judging: name resolution, each host's facts, this host."""

    resolved: Dict[str, Optional[List[str]]]  # hostfile hosts and the master address
    facts: Dict[str, Facts]
    tools: Dict[str, Optional[str]]  # ssh/pdsh here -> path or None
    local_ifaces: Dict[str, List[str]]
    local_hostname: str
    local_hostname_addr: Optional[str]
    master_local: bool
    port_busy: Optional[str]  # why the master port cannot be bound here (None: free or not tested)
    route_source: Optional[str]
    token: Optional[str] = None  # the file written to test sharing
    token_dir: Optional[str] = None
    notes: Dict[str, str] = field(default_factory=dict)


def _hosts_text(setup: Setup) -> str:
    return f"{len(setup.hosts)} host(s), {sum(h.slots for h in setup.hosts)} slots"


def check_hostfile(setup: Setup, f: Findings) -> CheckResult:
    if not setup.hostfile:
        return CheckResult("hostfile", "none given: one node, this host")
    return CheckResult("hostfile", f"{setup.hostfile}: {_hosts_text(setup)}")


def check_tools(setup: Setup, f: Findings) -> CheckResult:
    r = CheckResult("tools", "ssh and pdsh on PATH" if setup.multi_node else "one node: no ssh/pdsh needed")
    if setup.multi_node:
        for tool in ("ssh", "pdsh"):
            if not f.tools.get(tool):
                r.problems.append(Problem("tools", None, f"{tool} is not on PATH here (DeepSpeed's multi-node "
                                          f"runner starts the nodes with pdsh over ssh)",
                                          f"install it (Debian: apt-get install {PACKAGES[tool]}) "
                                          "or launch with --launcher openmpi/slurm"))
    return r


def check_resolve(setup: Setup, f: Findings) -> CheckResult:
    r = CheckResult("resolve", f"every host name resolves ({len(setup.hosts)})" if setup.hosts else "no hosts named")
    for h in setup.hosts:
        addrs = f.resolved.get(h.name)
        if addrs is None:
            r.problems.append(Problem("resolve", h.name, "the resolver gave no answer within 5 s",
                                      "fix DNS or add the host to /etc/hosts on every node"))
        elif not addrs:
            r.problems.append(Problem("resolve", h.name, f"host name does not resolve (hostfile line {h.line})",
                                      "correct the name in the hostfile or add it to /etc/hosts on every node"))
    return r


def _ssh_problem(host: str, error: str) -> Problem:
    e = error.lower()
    if "permission denied" in e:
        msg = "ssh refuses password-less login"
        fix = f"add this user's public key to {host}:~/.ssh/authorized_keys (ssh-copy-id {host})"
    elif "host key verification failed" in e:
        msg = "ssh does not know the host key"
        fix = f"accept it once (ssh {host} true) or add it to ~/.ssh/known_hosts"
    elif "connection refused" in e:
        msg = "no ssh server answers (connection refused)"
        fix = f"start sshd on {host} or set its port in PDSH_SSH_ARGS_APPEND or ~/.ssh/config"
    elif "could not resolve" in e or "name or service not known" in e:
        msg, fix = "ssh cannot resolve the name", "correct the hostfile, DNS or /etc/hosts"
    elif any(w in e for w in ("timed out", "no route", "unreachable", "no answer within")):
        msg, fix = f"unreachable ({error[:80]})", f"check {host} is up and its network link; ping {host}"
    else:
        msg, fix = f"ssh failed ({error[:80]})", f"make `ssh -o BatchMode=yes {host} true` succeed"
    return Problem("ssh", host, msg, fix)


def check_ssh(setup: Setup, f: Findings) -> CheckResult:
    if not setup.multi_node:
        return CheckResult("ssh", "one node: launched here without ssh")
    r = CheckResult("ssh", f"password-less ssh to all {len(setup.hosts)} hosts")
    for h in setup.hosts:
        facts = f.facts.get(h.name)
        if f.resolved.get(h.name) and facts is not None and not facts.reached:
            r.problems.append(_ssh_problem(h.name, facts.error))
    return r


def check_remote_env(setup: Setup, f: Findings) -> CheckResult:
    import sys

    r = CheckResult("environment", f"{sys.executable} and {os.getcwd()} exist on every host")
    for h in setup.hosts:
        facts = f.facts.get(h.name)
        if facts is None or not facts.reached:
            continue
        if facts.python is False:
            r.problems.append(Problem("environment", h.name, f"{sys.executable} is missing (pdsh runs the launching "
                                      "node's interpreter on every node)",
                                      "install the same environment at the same path on every node"))
        if facts.cwd is False:
            r.problems.append(Problem("environment", h.name, f"the launch directory {os.getcwd()} is missing",
                                      "launch from a directory every node has (a shared filesystem)"))
    return r


def check_master(setup: Setup, f: Findings) -> CheckResult:
    addrs = f.resolved.get(setup.master_addr)
    r = CheckResult("master", f"{setup.master_addr} ({setup.master_from})")
    if not addrs and setup.master_addr not in {h.name for h in setup.hosts}:  # else the resolve check says it
        r.problems.append(Problem("master", None, f"master address {setup.master_addr} ({setup.master_from}) "
                                  "does not resolve", "give an address every node can reach: --master-addr/MASTER_ADDR"))
    elif setup.multi_node and any(is_loopback(a) for a in addrs):
        r.problems.append(Problem("master", None, f"master address {setup.master_addr} ({setup.master_from}) is "
                                  f"loopback ({addrs[0]}) but the hosts span {len(setup.hosts)} machines",
                                  "set MASTER_ADDR/--master-addr to the first node's network address (hostname -I)"))
    return r


def check_port(setup: Setup, f: Findings) -> CheckResult:
    port = setup.master_port
    if not f.master_local:
        return CheckResult("port", f"{port}: the master is another host; run doctor there to test its port")
    r = CheckResult("port", f"{port} free here" + (" and reachable from every host" if setup.multi_node else ""))
    if f.port_busy:
        r.problems.append(Problem("port", None, f"master port {port} cannot be bound here ({f.port_busy})",
                                  "pick a free port: --master_port / MASTER_PORT (ss -ltnp shows who holds it)"))
        return r
    for h in setup.hosts:
        facts = f.facts.get(h.name)
        if facts is not None and facts.port_open is False:
            r.problems.append(Problem("port", h.name, f"cannot connect to {setup.master_addr}:{port} (blocked?)",
                                      f"open TCP port {port} (and the ephemeral range) between the nodes"))
    return r


def _ifname_problems(var: str, value: str, names: List[str], host: Optional[str]) -> List[Problem]:
    if var == "NCCL_SOCKET_IFNAME" and value.startswith("^"):
        return []  # an exclusion list names interfaces not to use
    exact = var == "GLOO_SOCKET_IFNAME" or value.startswith("=")
    wanted = [w for w in value.lstrip("=").split(",") if w]
    out = []
    for w in wanted:
        found = w in names if exact else any(n.startswith(w) for n in names)
        if not found:
            out.append(Problem("interface", host, f"{var}={value}: no interface {'named' if exact else 'starting'} "
                               f"{w!r} (has {', '.join(names) or 'none'})", f"set {var} to an interface this host has"))
    return out


def check_interface(setup: Setup, f: Findings) -> CheckResult:
    src = f.route_source
    iface = next((n for n, addrs in f.local_ifaces.items() if src in addrs), None) if src else None
    r = CheckResult("interface", f"{setup.master_addr} is reached via {iface or '?'} ({src or 'no route'})")
    lo = any(is_loopback(a) for a in f.local_ifaces.get(iface or "", []))
    suggest = iface if iface and not lo else "the interface on the nodes' network (ip -o addr)"
    if src is None and f.resolved.get(setup.master_addr):
        r.problems.append(Problem("interface", None, f"no route from this host to {setup.master_addr}",
                                  "fix the routing table (ip route) or the master address"))
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = setup.env.get(var)
        if not value:
            continue
        r.problems += _ifname_problems(var, value, sorted(f.local_ifaces), None)
        for h in setup.hosts:
            facts = f.facts.get(h.name)
            if setup.multi_node and facts is not None and facts.interfaces is not None:
                r.problems += _ifname_problems(var, value, facts.interfaces, h.name)
        if setup.multi_node and not value.startswith("^") and any(is_loopback(a) for n in value.lstrip("=").split(",")
                                    for a in f.local_ifaces.get(n, [])):
            r.problems.append(Problem("interface", None, f"{var}={value} is loopback but the hosts span machines",
                                      f"set {var}={suggest}"))
    if setup.multi_node and not setup.env.get("GLOO_SOCKET_IFNAME"):
        seen = {f"{f.local_hostname} (here)": f.local_hostname_addr}
        seen.update({h.name: f.facts[h.name].hostname_addr for h in setup.hosts
                     if h.name in f.facts and f.facts[h.name].reached})
        for host, addr in seen.items():
            if addr and is_loopback(addr):
                r.problems.append(Problem("interface", host, f"the host's own name resolves to {addr}: gloo binds "
                                          "that loopback address when GLOO_SOCKET_IFNAME is unset",
                                          f"export GLOO_SOCKET_IFNAME={suggest} "
                                          "(or map the hostname to its network address in /etc/hosts)"))
    return r


def check_devices(setup: Setup, f: Findings) -> CheckResult:
    if not setup.hosts:
        return CheckResult("devices", f"this host: {f.facts[''].gpus if '' in f.facts else '?'}")
    seen = []
    r = CheckResult("devices", "")
    kinds = {h.name: (f.facts[h.name].gpus if h.name in f.facts else None) for h in setup.hosts}
    any_gpu = any(k and k.isdigit() and int(k) > 0 for k in kinds.values())
    for h in setup.hosts:
        g = kinds[h.name]
        if g is None:
            continue  # not reached: reported by ssh
        seen.append(f"{h.name}={g if g == 'cpu' else g + ' GPUs'}/{h.slots} slots")
        if g == "error":
            r.problems.append(Problem("devices", h.name, "nvidia-smi -L failed",
                                      "check the NVIDIA driver there (nvidia-smi)"))
        elif g == "cpu" and any_gpu:
            r.problems.append(Problem("devices", h.name, "no GPU (no nvidia-smi) while other hosts have GPUs",
                                      "remove the host from the hostfile or install its driver"))
        elif g.isdigit() and int(g) < h.slots:
            r.problems.append(Problem("devices", h.name, f"{g} GPU(s) but slots={h.slots} (hostfile line {h.line})",
                                      f"set slots={g} or fix the node"))
    r.summary = ", ".join(seen[:8]) + (f" (+{len(seen) - 8} more)" if len(seen) > 8 else "") or "no host reached"
    return r


def check_run_dir(setup: Setup, f: Findings) -> CheckResult:
    if not setup.run_dir:
        return CheckResult("run-dir", "none given (--run-dir or CONFIG): sharing not tested")
    if os.path.exists(setup.run_dir) and not os.path.isdir(setup.run_dir):
        return CheckResult("run-dir", setup.run_dir, [Problem("run-dir", None, f"{setup.run_dir} is a file, not a "
                                                              "directory", "choose another run directory")])
    if not setup.multi_node:
        return CheckResult("run-dir", f"{setup.run_dir}: one node, nothing to share")
    r = CheckResult("run-dir", f"{setup.run_dir} is shared by every host")
    if f.token is None:
        r.problems.append(Problem("run-dir", None, f"cannot write a test file in {f.token_dir or setup.run_dir}",
                                  "make the run directory writable here"))
        return r
    unshared = [h.name for h in setup.hosts if h.name in f.facts and f.facts[h.name].shared is False]
    if unshared and setup.node_local_ok:
        r.summary = f"{setup.run_dir} is not shared with {len(unshared)} host(s); checkpoint.storage: node_local"
    elif unshared:
        r.problems += [Problem("run-dir", h, f"{setup.run_dir} is not shared with this host (a file written here "
                               "is not seen there): checkpoints need a shared directory", SHARE_FIX) for h in unshared]
    return r


def check_layout(setup: Setup, f: Findings) -> CheckResult:
    world = sum(h.slots for h in setup.hosts)
    if not setup.config or not setup.hosts:
        return CheckResult("layout", "needs CONFIG and --hostfile: not checked")
    r = CheckResult("layout", f"{setup.config}: the layout fits {world} ranks")
    if setup.config_world_problem:
        r.problems.append(Problem("layout", None, setup.config_world_problem,
                                  "change parallel.tp/pp or the hostfile's slots"))
    return r


CHECKS = [check_hostfile, check_tools, check_resolve, check_ssh, check_remote_env, check_master, check_port,
          check_interface, check_devices, check_run_dir, check_layout]
