"""``megallama network --gpu TYPE --out cluster.yaml``, under any launcher on 2+ nodes: times the
ZeRO-3/FSDP rings across this cluster's nodes (:mod:`megallama.profiling.measure_network`) and
writes a copy of the GPU profile with the share of the NICs they reached (``cross_node_share``),
for ``plan``/``estimate``/``validate --gpu cluster.yaml`` to cost this cluster as it runs."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

NAME = "network"
HELP = ("measure the share of the NICs ZeRO-3/FSDP rings reach across this cluster's nodes and write it into "
        "a GPU profile file (cross_node_share); any launcher, 2+ nodes")


def add_arguments(p) -> None:
    p.add_argument("--gpu", required=True, help="the profile the nodes match (name, or a profile YAML)")
    p.add_argument("--out", required=True, help="profile file to write (refused if it exists)")
    p.add_argument("--name", default=None, help="the written profile's name (default: the GPU's, + '-cluster')")
    p.add_argument("--mib", type=int, default=256, help="MiB per call, the unsharded tensor (default 256)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per ring and op; the median counts (default 5)")


def run(args) -> int:
    import torch.distributed as dist

    from megallama.errors import UserError
    from megallama.profiling.hardware import load_hardware, profile_source
    from megallama.train.distributed import device_for, finish_distributed, init_distributed, on_rank0_then_share

    if args.mib < 1 or args.reps < 1:
        raise UserError("--mib and --reps must be >= 1")
    if args.gpu.lower() == "cpu":
        raise UserError("--gpu cpu: the measured CPU profile already costs its links as measured; name the GPU "
                        "profile the nodes match (e.g. h100-sxm, or a profile YAML)")
    hw = load_hardware(args.gpu)
    out = Path(args.out)
    info = init_distributed()
    on_rank0_then_share(lambda: _check_out(out))
    from megallama.profiling.measure_network import measure
    from megallama.profiling.steptime import Efficiency
    from megallama.train.storage import host_id

    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host_id())
    rank0 = dist.get_rank() == 0
    timings = measure(hw, hosts, args.mib << 20, args.reps, Efficiency().bus, device_for(info.local_rank),
                      log=print if rank0 else (lambda *_: None))
    share = max(0.001, round(min(t.share for t in timings), 3))
    command = f"megallama network --gpu {args.gpu} --out {out} --mib {args.mib} --reps {args.reps}"
    # rank 0 writes; a failed write is every rank's error, so none waits on it
    on_rank0_then_share(lambda: _write(out, profile_source(args.gpu), args.name or f"{hw.name}-cluster", share,
                                       timings, len(set(hosts)), command))
    if rank0:
        print(f"network: cross_node_share {share} (the slowest ring) written to {out}; cost this cluster with "
              f"--gpu {out}")
    finish_distributed()
    return 0


def _check_out(out: Path) -> None:
    from megallama.errors import UserError

    if out.exists():
        raise UserError(f"--out {out}: exists; name a new file (nothing was measured or written)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no directory {out.parent}")
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"--out {out}: expected a .yaml file name (so --gpu reads it as a profile file)")


def _write(out: Path, source: Path, name: str, share: float, timings, nodes: int, command: str) -> None:
    """The source profile with ``name`` and ``cross_node_share`` set, the measurement in its
    header; written beside ``out`` and checked by loading it before it takes ``out``'s name."""
    import yaml

    from megallama.errors import UserError
    from megallama.profiling.hardware import load_profile_file

    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    data.pop("aliases", None)   # names on the command line belong to shipped profiles
    data.update(name=name, cross_node_share=share)
    lines = [f"# {source.name} as measured on this cluster by `{command}`",
             f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {nodes} nodes; per ring (members, "
             f"per node) and op: median seconds, bus GB/s, share of the nominal"]
    lines += [f"#   {t.ring} ({t.members}, {t.per_node}) {t.op} {t.payload_bytes / 2 ** 20:.0f} MiB: {t.seconds:.4f} s, "
              f"{t.bus_bandwidth / 1e9:.2f} GB/s, {t.share:.3f}" for t in timings]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text("\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        load_profile_file(tmp)
        os.link(tmp, out)   # never over a file that appeared since the check
    except FileExistsError:
        raise UserError(f"--out {out}: appeared while measuring; left as it is (the measurement is above)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
