"""What each launcher (none, ``deepspeed``, ``torchrun``, ``mpiexec``, ``srun``) says about this
rank, turned into the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT torch reads.

Two launchers leave the master address to us: ``srun`` (the first host of the nodelist) and
``mpiexec`` (rank 0's address, which must be one the other hosts can reach: a hostname mapped to
127.0.1.1 is the common trap, refused in one line instead of a hang).
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megallama.errors import UserError

MAX_HOSTS = 1 << 20  # a nodelist expanding past this is a typo (``node[0-99999999]``), not a cluster


@dataclass
class LaunchInfo:
    launcher: str
    rank: int
    world_size: int
    local_rank: int


# ------------------------------------------------------------------------------ SLURM nodelists
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _parse_item(item: str, field: str) -> List[list]:
    """``rack[1-2]-n[01,03]`` -> ``[["rack"], [(1, 2, 1)], ["-n"], [(1, 1, 2), (3, 3, 2)]]``: the
    factors whose cartesian product (the last varying fastest, as SLURM lists them) is its hosts."""
    factors, pos = [], 0
    for m in re.finditer(r"\[([^\[\]]*)\]", item):
        if m.start() > pos:
            factors.append([item[pos:m.start()]])
        values = []
        for part in m.group(1).split(","):
            r = _RANGE.fullmatch(part)
            if not r:
                raise UserError(f"{field}: bad range {part!r} in {item!r} (expected N or N-M inside [...])")
            lo, hi = r.group(1), r.group(2) or r.group(1)
            if int(hi) < int(lo):
                raise UserError(f"{field}: range {part!r} in {item!r} runs backwards")
            if int(hi) - int(lo) >= MAX_HOSTS:
                raise UserError(f"{field}: range {part!r} in {item!r} names over {MAX_HOSTS} hosts")
            values.append((int(lo), int(hi), len(lo)))
        factors.append(values)
        pos = m.end()
    if pos < len(item):
        factors.append([item[pos:]])
    literal = "".join(f[0] for f in factors if isinstance(f[0], str))
    if "[" in literal or "]" in literal:
        raise UserError(f"{field}: unbalanced or nested brackets in {item!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]*", literal):
        raise UserError(f"{field}: {item!r} is not a host name (letters, digits, '.', '-', '_' and [ranges])")
    return factors


def _values(factor) -> Iterator[str]:
    if isinstance(factor[0], str):
        yield from factor
        return
    for lo, hi, width in factor:  # SLURM pads to the low bound's width: [08-10] -> 08 09 10
        for n in range(lo, hi + 1):
            yield str(n).zfill(width)


def _expand(factors) -> Iterator[str]:
    if not factors:
        yield ""
        return
    for head in _values(factors[0]):
        for tail in _expand(factors[1:]):
            yield head + tail


def _split_top(nodelist: str) -> List[str]:
    """Split at the commas outside brackets."""
    items, depth, cur = [], 0, []
    for ch in nodelist:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return items


def iter_nodelist(nodelist: str, field: str = "SLURM_JOB_NODELIST") -> Iterator[str]:
    """The hosts of a SLURM hostlist in SLURM's order; the whole list is checked before the first
    host is given (a bad list is one line naming ``field``)."""
    text = nodelist.strip()
    if not text or any(c.isspace() for c in text):
        raise UserError(f"{field}: expected a SLURM nodelist such as 'node[01-04]', got {nodelist[:100]!r}")
    parsed = []
    for item in _split_top(text):
        if not item:
            raise UserError(f"{field}: empty entry in the nodelist {text[:100]!r}")
        parsed.append(_parse_item(item, field))
    for factors in parsed:
        yield from _expand(factors)


def expand_nodelist(nodelist: str, field: str = "SLURM_JOB_NODELIST") -> List[str]:
    """``rack[1-2]-node[01-02],gpu7`` -> ``rack1-node01 rack1-node02 rack2-node01 rack2-node02 gpu7``."""
    hosts = []
    for host in iter_nodelist(nodelist, field):
        hosts.append(host)
        if len(hosts) > MAX_HOSTS:
            raise UserError(f"{field}: the nodelist names over {MAX_HOSTS} hosts")
    return hosts


def first_slurm_host(nodelist: str, field: str = "SLURM_JOB_NODELIST") -> str:
    """The first host: ``scontrol show hostnames`` where SLURM is installed (its own parser), else ours."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            first = out.stdout.split()[:1] if out.returncode == 0 else []
            if first:
                return first[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return next(iter_nodelist(nodelist, field))


# ---------------------------------------------------------------------------- MPI master address
def _is_loopback(addr: Optional[str]) -> bool:
    try:
        return addr is None or ipaddress.ip_address(addr).is_loopback or ipaddress.ip_address(addr).is_unspecified
    except ValueError:
        return True


def _routed_source(target: str) -> Optional[str]:
    """This host's address on the route to ``target`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def own_address(peers: Sequence[str] = ()) -> Optional[str]:
    """A non-loopback IPv4 address of this host: its hostname's, else the one it reaches ``peers``
    (other ranks' hostnames) from, else the default route's; None when it has none."""
    def resolve(name: str) -> List[str]:
        try:
            return [a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)]
        except OSError:
            return []

    for addr in resolve(socket.gethostname()):
        if not _is_loopback(addr):
            return addr
    targets = [a for p in peers for a in resolve(p) if not _is_loopback(a)] + ["192.0.2.1"]  # TEST-NET: any route
    for target in targets:
        addr = _routed_source(target)
        if not _is_loopback(addr):
            return addr
    return None


def host_identity() -> Tuple[str, str]:
    """(hostname, machine+network namespace): two ranks share 127.0.0.1 only when both match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = ""
    return socket.gethostname(), f"{boot}/{netns}"


def master_addr_for(hosts: Sequence[Tuple[str, str]], rank0_addr: Optional[str]) -> str:
    """The address every rank dials: loopback when all ranks share one host (always reachable
    there), else rank 0's address, which must not be loopback."""
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    if _is_loopback(rank0_addr):
        names = sorted({h for h, _ in hosts})
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise UserError(f"mpiexec: ranks span {len(set(hosts))} hosts ({shown}) but rank 0's host {hosts[0][0]!r} "
                        f"has no address but loopback ({rank0_addr or 'unresolvable'}) for the others to reach; "
                        "set MASTER_ADDR to its network address (mpiexec -x/-env MASTER_ADDR=...) or map its "
                        "hostname to that address in /etc/hosts")
    return rank0_addr


def mpi_master_addr(comm=None) -> str:
    """Rank 0's address over MPI (every rank's host gathered), so mpiexec needs no MASTER_ADDR."""
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise UserError("mpiexec launch needs mpi4py: pip install 'megallama[mpi]'") from None
        comm = MPI.COMM_WORLD
    hosts = comm.allgather(host_identity())
    addr = own_address([h for h, _ in hosts if h != hosts[0][0]]) if comm.Get_rank() == 0 else None
    addr = comm.bcast(addr, root=0)
    try:
        return master_addr_for(hosts, addr)
    except UserError as err:
        err.same_on_every_rank = True  # printed once per node, as every rank reaches it alike
        raise


def _mpi_world_size() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launcher(env: Optional[Dict[str, str]] = None) -> LaunchInfo:
    """Fill the torch.distributed variables from whichever launcher started us (in ``env``)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed, torchrun, or already resolved
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        env.setdefault("LOCAL_RANK", "0")
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        launcher = "mpi"
        rank = env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK") or env.get("PMIX_RANK")
        size = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE") or env.get("PMIX_SIZE")
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID") or env.get("PMI_LOCAL_RANK")
        if size is None:
            size = str(_mpi_world_size())
        env.update(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=local or rank)
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = mpi_master_addr()
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            field = "SLURM_JOB_NODELIST" if "SLURM_JOB_NODELIST" in env else "SLURM_NODELIST"
            env["MASTER_ADDR"] = first_slurm_host(env[field], field) if field in env else "127.0.0.1"
        env.setdefault("MASTER_PORT", "29500")
    else:
        launcher = "none"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    return LaunchInfo(launcher, int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
