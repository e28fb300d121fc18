"""DeepSpeed's CPU comm op gives each rank a shared-memory all-reduce workspace (~67 MB of RAM in
``/dev/shm``) when all ranks share one node, and never unlinks it: every run under DeepSpeed's
launcher left its ranks' segments behind until ``/dev/shm``, which is RAM, filled.

A segment's name is needed only while the ranks map each other's, inside DeepSpeed's start-up.
Once every rank has, each unlinks its own: the mappings stay valid, and the memory goes with the
processes however they end (a crash or a kill included).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's csrc/cpu/comm/shm.cpp, SHM_BUFFER_NAME


def buffer_path(rank: Union[int, str], environ: Mapping[str, str] = os.environ) -> Path:
    """Rank ``rank``'s segment, named as DeepSpeed names it: user id, then the master address and
    port its start-up read (empty when unset), then the rank (``"*"``: a glob of every rank's)."""
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_after_start() -> Optional[Path]:
    """Every rank calls this once DeepSpeed's comm layer has started on it. After a barrier (each
    rank's start-up maps every other rank's segment, retrying until it exists) this rank unlinks
    its own; returns it, or None where DeepSpeed made none (ranks on several nodes, or a GPU)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    if dist.get_world_size() > 1:
        dist.barrier()
    path = buffer_path(dist.get_rank())
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path
