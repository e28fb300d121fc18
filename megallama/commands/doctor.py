"""``megallama doctor``: before a multi-node launch, check what would make it hang or fail
minutes in (a host ssh cannot reach, a loopback master, a busy port, gloo on the wrong interface,
slots a node cannot fill, a run directory only one node sees), each problem one line with its fix."""
from __future__ import annotations

import json
import os
import sys

from megallama.errors import UserError

NAME = "doctor"
HELP = "preflight a (multi-node) launch: hosts, ssh/pdsh, master address and port, interface, devices, run dir"


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="run-config YAML (its run_dir, layout and checkpoint.storage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override the launch will pass, e.g. parallel.tp=2 (repeatable)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('host slots=N' lines); none: this host only")
    p.add_argument("--master-addr", default=None, help="default: MASTER_ADDR, else the hostfile's first host")
    p.add_argument("--master-port", type=int, default=None, help="default: MASTER_PORT, else 29500")
    p.add_argument("--run-dir", default=None, help="the run directory to test for sharing (default: the config's)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def _port(args) -> int:
    raw = args.master_port if args.master_port is not None else os.environ.get("MASTER_PORT", "29500")
    name = "--master-port" if args.master_port is not None else "MASTER_PORT"
    if not (str(raw).strip().isdigit() and 0 < int(raw) < 65536):
        raise UserError(f"{name}: expected a port number 1-65535, got {str(raw)[:20]!r}")
    return int(raw)


def _master(args, hosts):
    if args.master_addr is not None:
        addr, origin = args.master_addr, "--master-addr"
    elif os.environ.get("MASTER_ADDR"):
        addr, origin = os.environ["MASTER_ADDR"], "MASTER_ADDR"
    elif hosts:
        addr, origin = hosts[0].name, "the hostfile's first host"
    else:
        addr, origin = "127.0.0.1", "default for one node"
    if not addr.strip() or any(c.isspace() for c in addr) or not addr.isprintable():
        raise UserError(f"{origin}: expected a host name or address, got {addr[:40]!r}")
    return addr, origin


def _config(args, hosts):
    """The run directory to test, whether node-local checkpoints are allowed, a layout problem."""
    if args.config is None:
        if args.overrides:
            raise UserError("--set: needs a CONFIG to apply to")
        return None, False, None
    from megallama.config import ConfigError, load_run_config

    cfg = load_run_config(args.config, args.overrides)
    ck = cfg.checkpoint
    run_dir = ck.dir or os.path.join(cfg.run_dir, "checkpoints")
    world_problem = None
    if hosts:
        try:
            cfg.check_layout(sum(h.slots for h in hosts))
        except ConfigError as exc:
            world_problem = str(exc)
    return run_dir, getattr(ck, "storage", "shared") == "node_local", world_problem


def run(args) -> int:
    from megallama.doctor.diagnose import diagnose
    from megallama.doctor.hostfile import parse_hostfile
    from megallama.doctor.model import Setup
    from megallama.doctor.system import System

    hosts = parse_hostfile(args.hostfile) if args.hostfile is not None else []
    addr, origin = _master(args, hosts)
    port = _port(args)
    run_dir, node_local, world_problem = _config(args, hosts)
    run_dir = args.run_dir if args.run_dir is not None else run_dir
    if run_dir is not None and not run_dir.strip():
        raise UserError("--run-dir: expected a directory, got ''")
    setup = Setup(hostfile=args.hostfile, hosts=hosts, master_addr=addr, master_from=origin, master_port=port,
                  run_dir=os.path.abspath(run_dir) if run_dir else None, node_local_ok=node_local,
                  env=dict(os.environ), config=args.config, config_world_problem=world_problem)
    results = diagnose(setup, System())
    problems = sum(len(r.problems) for r in results)
    if args.json:
        print(json.dumps({"ok": problems == 0, "problems": problems, "checks": [r.as_dict() for r in results]}))
    else:
        for r in results:
            print("\n".join(r.lines()))
    sys.stdout.flush()
    if problems:
        sys.stderr.write(f"megallama doctor: error: {problems} problem(s) would break this launch (listed above)\n")
        return 1
    return 0
