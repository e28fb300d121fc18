"""Learn everything the checks need (in parallel, each contact bounded), then run every check.
The token file written to test sharing is removed whatever happens."""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Tuple

from megallama.doctor.checks import CHECKS, Findings
from megallama.doctor.model import CheckResult, Setup
from megallama.doctor.probe import probe_here, probe_remote
from megallama.doctor.system import System, is_loopback, per_host


def _existing_dir(path: str) -> str:
    """``path`` or its nearest existing parent: a run directory not made yet is tested where it
    will be made (train makes it there on every node)."""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _master_local(setup: Setup, addrs: Optional[List[str]], local_ifaces) -> bool:
    mine = {a for v in local_ifaces.values() for a in v}
    return bool(addrs) and any(is_loopback(a) or a in mine for a in addrs)


def _token(system: System, setup: Setup) -> Tuple[Optional[str], Optional[str]]:
    if not (setup.multi_node and setup.run_dir):
        return None, None
    where = _existing_dir(setup.run_dir)
    return system.write_token(where), where


def diagnose(setup: Setup, system: System) -> List[CheckResult]:
    names = list(dict.fromkeys([h.name for h in setup.hosts] + [setup.master_addr]))
    resolved = dict(zip(names, per_host(system.resolve, names)))
    local_ifaces = system.interfaces()
    master_addrs = resolved.get(setup.master_addr)
    master_local = _master_local(setup, master_addrs, local_ifaces) or not setup.multi_node
    hostname = system.hostname()
    own = system.resolve(hostname) or []
    f = Findings(resolved=resolved, facts={}, tools={t: system.which(t) for t in ("ssh", "pdsh")},
                 local_ifaces=local_ifaces, local_hostname=hostname, local_hostname_addr=own[0] if own else None,
                 master_local=master_local, port_busy=system.port_problem(setup.master_port) if master_local else None,
                 route_source=system.route_source(master_addrs[0]) if master_addrs else None)
    f.token, f.token_dir = _token(system, setup)
    try:
        if setup.multi_node:
            # a loopback master is named by the master check; other hosts cannot reach it anyway
            port_test = master_local and not f.port_busy and not any(map(is_loopback, master_addrs or []))
            with system.listening(setup.master_port) if port_test else contextlib.nullcontext(False) as listening:
                reachable = [h.name for h in setup.hosts if resolved.get(h.name)]
                got = per_host(lambda h: probe_remote(system, setup, h, f.token, bool(listening)), reachable)
                f.facts = dict(zip(reachable, got))
        else:  # one node, or none named: this host, read directly
            f.facts = {setup.hosts[0].name if setup.hosts else "": probe_here(system)}
    finally:
        if f.token:
            system.remove(f.token)
    return [check(setup, f) for check in CHECKS]

