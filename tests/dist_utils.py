"""Run a function on N gloo CPU ranks (spawned processes) and return rank 0's result."""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # Pickled here, by value: a tensor sent through a torch queue travels as a file descriptor
        # the parent must fetch from this process, which may have exited by then.
        result = pickle.dumps(fn(rank, world, *args))
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 240.0):
    """``fn(rank, world, *args)`` on each rank; raises with the first failing rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, status, payload = queue.get()
        if status == "error":
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} failed:\n{payload}")
        results[rank] = pickle.loads(payload)
    for p in procs:
        p.join(timeout)
    return results[0]


def sigint_as_a_terminal_has():
    """``preexec_fn`` for a child a test will SIGINT: a suite started in the background (``cmd &``
    in a script, as CI may) runs with SIGINT ignored, which its children inherit, and Python then
    installs no KeyboardInterrupt handler. A user at a terminal has the default; so does the child."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
