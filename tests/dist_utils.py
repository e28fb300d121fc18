"""Run a function on N gloo CPU ranks (forked from a fork server) and return rank 0's result."""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp
from multiprocessing.connection import wait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the fork server imports once per session (multiprocessing's forkserver: a fresh interpreter,
# not a fork of pytest); each rank forks from it in a fraction of a second instead of importing
# torch and DeepSpeed again as a spawned process does (~3 s of CPU a rank). torch._dynamo (torch's
# optimizers import it at the first step, ~1.2 s) and DeepSpeed's Muon module (its ZeRO and bf16
# optimizers import it for a type check, ~1.1 s) start no thread or process on import.
PRELOAD = ["torch", "deepspeed", "megallama.train.engine", "megallama.train.checkpoint",
           "torch._dynamo", "deepspeed.runtime.zero.muon.muon_optimizer"]


def forkserver_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs: every caller names the same
    return ctx


def _worker(rank, world, port, fn, args, queue, environ, cwd):
    import torch
    import torch.distributed as dist

    os.environ.clear()  # the caller's environment and directory now, as a spawned process has them
    os.environ.update(environ)
    os.chdir(cwd)
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
    ctx = forkserver_context()
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, dict(os.environ), os.getcwd()))
             for r in range(world)]
    for p in procs:
        p.start()
    results, running = {}, {p.sentinel: r for r, p in enumerate(procs)}
    while len(results) < world:
        # a rank that dies before it reports (killed, or failing to unpickle fn) fails the call
        # instead of leaving it waiting for a result that never comes
        ready = wait([queue._reader] + list(running), timeout)
        if queue._reader in ready:
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = pickle.loads(payload)
                continue
            failure = f"rank {rank} failed:\n{payload}"
        elif ready:
            rank = running.pop(ready[0])
            if rank in results:
                continue
            failure = f"rank {rank} exited with code {procs[rank].exitcode} without a result"
        else:
            failure = f"no result from ranks {sorted(set(range(world)) - set(results))} within {timeout:.0f} s"
        for p in procs:
            p.kill()
        raise AssertionError(failure)
    for p in procs:
        p.join(timeout)
    return results[0]


def sigint_as_a_terminal_has():
    """``preexec_fn`` for a child a test will SIGINT: a suite started in the background (``cmd &``
    in a script, as CI may) runs with SIGINT ignored, which its children inherit, and Python then
    installs no KeyboardInterrupt handler. A user at a terminal has the default; so does the child."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
