"""Where checkpoint files live when a job spans nodes: one shared directory, or each node's own disk.

DeepSpeed assumes every rank sees every file (its ZeRO-1/2 loader reads every data-parallel
rank's optimizer file), as do Megatron and torchtitan. megallama makes the assumption explicit:
``checkpoint.storage`` is

* ``shared``: ``checkpoint.dir`` must be one directory every node sees; a start on directories
  that are not shared is refused in one line (a run that saved on node-local disks would find,
  at resume, half its files missing);
* ``node_local``: each node keeps the files its own ranks wrote (the manifest records the host of
  each), and every node also holds a full copy of the layout-free part (``universal/``,
  ``meta.json``, ``manifest.json``, ``latest``): the universal shards are copied to each node's
  local leader over the process group at save time. A resume then needs no other node's disk:
  each node verifies its own files and its copy, and the run restarts from the layout-free part
  (DeepSpeed's own files stay where they were written, for tools run after gathering them);
  so a resume at another layout, or on nodes that never held a given rank, works too. The cost
  is ``universal/`` written once per node. On a directory that turns out shared it acts as shared;
* ``auto`` (default): shared when the probe finds the directory shared, else refused as ``shared``
  is (a node-local directory is usually a mistake, and saying so beats a resume that cannot find
  its files).

The probe: each node's lowest rank writes a token named after its host, and after a barrier
checks it sees every other node's token. One node needs no probe. Host identity is
``socket.gethostname()``, or ``MEGALLAMA_HOSTNAME`` (read only in :func:`host_id`) so tests can
give ranks on one machine distinct hosts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.errors import UserError
from megallama.train.manifest import EVERY_NODE, Entry

log = logging.getLogger(__name__)
SETTINGS = ("auto", "shared", "node_local")
CHUNK = 64 << 20
LAYOUT_FREE = "universal/"


def host_id() -> str:
    return os.environ.get("MEGALLAMA_HOSTNAME") or socket.gethostname()


@dataclass(frozen=True)
class Storage:
    """How this job's checkpoint directory is laid out over nodes; ``hosts``: each rank's host."""

    node_local: bool = False
    hosts: Tuple[str, ...] = ()

    def leaders(self) -> List[int]:
        """The ranks that write and check node-wide files: rank 0, or each node's lowest rank."""
        if not self.node_local:
            return [0]
        return sorted({h: r for r, h in reversed(list(enumerate(self.hosts)))}.values())

    def is_leader(self, rank: int) -> bool:
        return rank in self.leaders()

    def peers(self, rank: int, world: int) -> List[int]:
        """The ranks that share verification work with ``rank``: all, or its node's."""
        if not self.node_local:
            return list(range(world))
        return [r for r, h in enumerate(self.hosts) if h == self.hosts[rank]]

    def host(self, rank: int) -> Optional[str]:
        """The host whose files ``rank`` checks (None: shared, every file)."""
        return self.hosts[rank] if self.node_local else None


def _all(value):
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def resolve(setting: str, ckpt_dir: Path, probe: bool) -> Storage:
    """Collective, at start-up: the storage this job checkpoints to, or the refusal in one line.
    ``probe``: the job saves or resumes (a job that does neither has nothing to probe)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return Storage(False, (host_id(),))
    hosts = tuple(_all(host_id()))
    if len(set(hosts)) == 1 or not probe:
        return Storage(False, hosts)
    blind = _probe(Path(ckpt_dir), Storage(True, hosts))
    if not blind:
        if setting == "node_local" and dist.get_rank() == 0:
            log.info("checkpoint.storage=node_local: %s is shared by every node, used as shared", ckpt_dir)
        return Storage(False, hosts)
    if setting == "node_local":
        return Storage(True, hosts)
    err = UserError(f"checkpoint.dir: {ckpt_dir} is not shared across nodes ({blind}); checkpoint.storage="
                    f"{setting} needs one directory every node sees: point checkpoint.dir at a shared filesystem, "
                    "or set checkpoint.storage=node_local to keep each node's files on its own disk")
    err.same_on_every_rank = True
    raise err


def _probe(ckpt_dir: Path, nodes: Storage) -> Optional[str]:
    """None when every node sees every other node's token in ``ckpt_dir``, else what was not seen."""
    rank = dist.get_rank()
    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    leader = nodes.is_leader(rank)
    token = ckpt_dir / f".storage-probe-{box[0]}-{nodes.hosts[rank]}"
    problem = None
    if leader:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            token.write_text(nodes.hosts[rank])
        except OSError as exc:
            problem = f"node {nodes.hosts[rank]} cannot write there: {exc.strerror or exc}"
    problems = [p for p in _all(problem) if p]
    if problems:
        raise UserError(f"checkpoint.dir: {ckpt_dir}: {problems[0]}")
    seen = None
    if leader:
        others = sorted(set(nodes.hosts) - {nodes.hosts[rank]})
        missing = [h for h in others if not (ckpt_dir / f".storage-probe-{box[0]}-{h}").is_file()]
        seen = f"node {nodes.hosts[rank]} does not see node {missing[0]}'s files there" if missing else None
    verdicts = [v for v in _all(seen) if v]
    if leader:
        token.unlink(missing_ok=True)
    return verdicts[0] if verdicts else None


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _send(path: Path, dst: int, nbytes: int) -> Optional[str]:
    problem, dev = None, _device()
    with open(path, "rb") as f:
        for start in range(0, nbytes, CHUNK):
            n = min(CHUNK, nbytes - start)
            data = f.read(n)
            if len(data) != n:  # keep the receiver in step; it sees a wrong checksum
                problem, data = f"{path}: shorter than its {nbytes} bytes while copying it", data.ljust(n, b"\0")
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev), dst)
    return problem


def _recv(path: Path, src: int, entry: Entry) -> Optional[str]:
    """Receives every chunk even when writing fails (the sender does not stop)."""
    h, problem, dev, nbytes, f = hashlib.sha256(), None, _device(), int(entry["bytes"]), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "wb")
    except OSError as exc:
        problem = f"{path}: could not write it ({exc.strerror or exc})"
    try:
        for start in range(0, nbytes, CHUNK):
            buf = torch.empty(min(CHUNK, nbytes - start), dtype=torch.uint8, device=dev)
            dist.recv(buf, src)
            data = buf.cpu().numpy().tobytes()
            h.update(data)
            if problem is None:
                try:
                    f.write(data)
                except OSError as exc:
                    problem = f"{path}: could not write it ({exc.strerror or exc})"
        if problem is None:
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        problem = problem or f"{path}: could not write it ({exc.strerror or exc})"
    finally:
        if f is not None:
            f.close()
    if problem is None and h.hexdigest() != entry["sha256"]:
        problem = f"{path}: copy from rank {src} has checksum {h.hexdigest()[:12]}, expected {entry['sha256'][:12]}"
    return problem


def replicate_layout_free(tag_dir: Path, files: Dict[str, Entry], storage: Storage) -> Optional[str]:
    """Collective (node-local storage): each ``universal/`` file copied from its writer to every
    other node's leader, one file at a time in the same order on every rank; its entry is marked
    as held by every node. Returns this rank's first failure."""
    rank, problem = dist.get_rank(), None
    leaders = storage.leaders()
    for rel in sorted(files):
        entry = files[rel]
        if not rel.startswith(LAYOUT_FREE):
            continue
        for dst in leaders:
            if storage.hosts[dst] == entry["host"]:
                continue
            if rank == entry["rank"]:
                problem = _send(tag_dir / rel, dst, int(entry["bytes"])) or problem
            elif rank == dst:
                got = _recv(tag_dir / rel, entry["rank"], entry)
                problem = problem or got
        entry["copies"] = EVERY_NODE
    return problem
