"""Process-group start-up under any launcher: DeepSpeed's comm layer (gloo on CPU, NCCL on GPUs)
over the variables ``launchers.detect_launcher`` resolved, and a rank's link to its launcher.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple, TypeVar

import torch

from megallama.errors import UserError
from megallama.train.launchers import LaunchInfo, detect_launcher

__all__ = ["LaunchInfo", "detect_launcher", "device_for", "finish_distributed", "init_distributed",
           "on_rank0_then_share"]

T = TypeVar("T")


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: int = 300, info: Optional[LaunchInfo] = None) -> LaunchInfo:
    """Start the default process group (via DeepSpeed's comm layer) for any launcher.

    One process needs no DeepSpeed comm layer (whose start-up JIT-loads a shared-memory op): a
    plain group serves ``eval``, and an engine adds DeepSpeed's layer on top when it
    is built (``build_engine`` checks the build lock there). Before DeepSpeed's comm start-up loads
    that op, a stale build lock is reported, not waited on."""
    from megallama.train.warmup_ops import check_comm_op_lock

    info = info or detect_launcher()
    backend = "nccl" if torch.cuda.is_available() else "gloo"

    from megallama.parallel.state import set_group_timeout

    set_group_timeout(timeout_s)
    if info.world_size == 1 and not torch.distributed.is_initialized():
        # an in-process store: one process needs no port (two single-process jobs never collide)
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                             timeout=datetime.timedelta(seconds=timeout_s))
        return info
    if backend == "gloo":
        check_comm_op_lock()
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s), rank=info.rank,
                               world_size=info.world_size)
    if backend == "gloo":  # the ranks have mapped DeepSpeed's shared-memory workspaces: unlink their names
        from megallama.train.comm_buffers import release_after_start

        release_after_start()
    if info.launcher == "deepspeed":  # a stopping rank may save a checkpoint first (preemption.py)
        stop_with_launcher(grace_s=max(10.0, float(timeout_s)))
    return info


def finish_distributed() -> None:
    """The end of a command every rank ran: all ranks meet, then the group is torn down here
    rather than at interpreter exit, where gloo's threads can be destroyed in an order that
    aborts the process (``cli._release_process_group`` does the same for a failed command)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def on_rank0_then_share(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone (it prepares data, chooses a checkpoint, takes a lock) and its
    value given to every rank. A ``UserError`` there is raised on every rank, marked as the same
    everywhere so it is printed once per node (cli.py); any other exception stays rank 0's own."""
    import torch.distributed as dist

    shared = dist.is_initialized() and dist.get_world_size() > 1
    box = [None, None]
    if not shared or dist.get_rank() == 0:
        try:
            box[0] = fn()
        except UserError as exc:
            box[1] = str(exc)
    if shared:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        err = UserError(box[1])
        err.same_on_every_rank = True
        raise err
    return box[0]


def _proc_stat(pid: int) -> Optional[Tuple[int, str]]:
    """``(parent pid, start time)`` of a live process (start time tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain(pid: Optional[int] = None) -> List[Tuple[int, str]]:
    """DeepSpeed's per-node launcher above this rank and the ``deepspeed`` runner above it, as
    ``(pid, start time)``: on one node the runner exits on SIGTERM/SIGINT without passing the
    signal on, leaving the launcher and the ranks running."""
    pid = os.getpid() if pid is None else pid
    chain = []
    stat = _proc_stat(pid)
    while stat and len(chain) < 2:
        parent = stat[0]
        pstat = _proc_stat(parent)
        wanted = "deepspeed.launcher.launch" if not chain else "deepspeed"
        if pstat is None or wanted not in _cmdline(parent):
            break
        chain.append((parent, pstat[1]))
        stat = pstat
    return chain


def stop_with_launcher(poll_s: float = 1.0, grace_s: float = 10.0) -> Optional[threading.Thread]:
    """A rank ends itself (SIGTERM, then a hard exit after ``grace_s``) once DeepSpeed's launcher
    or runner above it is gone, so a signal to the launcher always reaches the ranks. A training
    rank takes that SIGTERM as a preemption (a checkpoint, then exit 75); ``grace_s`` bounds a
    rank that cannot get there (stuck in a collective)."""
    chain = launcher_chain()
    if not chain:
        return None

    def watch():
        while all((_proc_stat(pid) or (0, None))[1] == start for pid, start in chain):
            time.sleep(poll_s)
        gone = next(pid for pid, start in chain if (_proc_stat(pid) or (0, None))[1] != start)
        sys.stderr.write(f"megallama: launcher process {gone} is gone (stopped by a signal?); stopping this rank\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    thread = threading.Thread(target=watch, name="megallama-launcher-watch", daemon=True)
    thread.start()
    return thread
