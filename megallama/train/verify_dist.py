"""Verifying a checkpoint with every rank at once, each reading a disjoint share of its files.

One rank hashing every file of a large checkpoint takes longer than a collective may wait (1.7 TB
at a few GB/s is tens of minutes); split over N ranks by bytes it takes 1/N of that. Under
node-local storage each node's ranks verify what their node holds (its own ranks' files and its
copy of the layout-free part) and each node's manifest must equal rank 0's. Every rank returns
the same answer: None, or the first problem in rank order, one line naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megallama.train import manifest as mf
from megallama.train.storage import Storage


def collective() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _all(value):
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def first_of_all(problem: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem in rank order, the same answer on every rank."""
    if not collective():
        return problem
    return next((p for p in _all(problem) if p), None)


def verify_all(tag_dir: Path, storage: Optional[Storage] = None, checksums: bool = True) -> Optional[str]:
    """Collective (every rank must call; one process: :func:`manifest.verify`)."""
    if not collective():
        return mf.verify(tag_dir, checksums)
    storage = storage or Storage()
    rank, world = dist.get_rank(), dist.get_world_size()
    entries = None
    if storage.is_leader(rank):
        path = tag_dir / mf.MANIFEST
        entries = mf.read_entries(path) if path.is_file() else f"{path}: missing (checkpoint incomplete)"
    read = _all(entries)
    where = (lambda r: f" (on node {storage.hosts[r]})") if storage.node_local else (lambda r: "")
    for r, got in enumerate(read):
        if isinstance(got, str):
            return got + where(r)
        if got is not None and got != read[0]:
            return f"{tag_dir / mf.MANIFEST}: differs from rank 0's copy{where(r)}"
    peers = storage.peers(rank, world)
    held = mf.held_on(read[0], storage.host(rank))
    mine = mf.share(held, len(peers))[peers.index(rank)]
    problems = _all(mf.check(tag_dir, mine, checksums))
    first = next(((r, p) for r, p in enumerate(problems) if p), None)
    return None if first is None else first[1] + where(first[0])
