"""``megallama ARGV`` forked from the tests' fork server: one process, or N local ranks, for tests
that need a run but do not test how it is launched.

Why: under torchrun, or as ``python -m megallama``, every process is a fresh interpreter that
imports torch, DeepSpeed and megallama (~3-5 s of CPU each, on top of torchrun's own agent): most
of a tiny run's cost, paid once per rank. Forked from ``dist_utils``' fork server, which imported
them once, a process starts in a fraction of a second. Each is still its own process running the
CLI's ``main`` from the top in the caller's environment and directory; ranks get the variables the
deepspeed launcher sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR/PORT; no
TORCHELASTIC_*, so the run reports launcher "deepspeed"). The launchers themselves (torchrun,
deepspeed, mpiexec, srun, pdsh) and the ``megallama`` script run as typed in
tests/test_launchers.py, tests/test_cluster_launchers.py and tests/test_documented_commands.py.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import wait
from typing import List, Optional, Sequence

from tests.dist_utils import forkserver_context, free_port

GRACE_S = 10.0  # after the first rank fails, as a launcher waits before killing the rest


def _rank_main(rank: int, world: Optional[int], port: int, module: str, argv: List[str], environ: dict, cwd: str,
               out_path: str, err_path: str) -> None:
    os.environ.clear()
    os.environ.update(environ)
    if world is not None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):  # fd level: C code and loggers made at import write here too
        os.dup2(os.open(path, os.O_WRONLY), fd)
    import torch

    # what torch read from the environment at import, in the server, read again from the caller's
    torch.set_num_threads(int(environ.get("OMP_NUM_THREADS", "1")))
    if "TORCH_LOGS" in environ:
        torch._logging._internal._init_logs()
    main = importlib.import_module("megallama.cli" if module == "megallama" else module).main
    sys.exit(main(argv))


def run_forked(argv: Sequence[str], world: Optional[int], environ: dict, cwd, timeout: float,
               module: str = "megallama") -> subprocess.CompletedProcess:
    """Like ``subprocess.run`` of a launcher with ``world`` local ranks (``None``: one process
    without a launcher's variables, as a plain ``megallama ...``): the first non-zero rank exit
    code (or 0), and every rank's stdout and stderr, in rank order. ``module``: one with a
    ``main(argv)``, as ``python -m MODULE ARGV`` would run."""
    ctx = forkserver_context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="megallama-ranks-") as tmp:
        paths = [(os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")) for r in range(world or 1)]
        for path in (p for pair in paths for p in pair):  # there to read even if a rank dies before it writes
            open(path, "w").close()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, module, list(argv), dict(environ), str(cwd),
                                                      *paths[r])) for r in range(world or 1)]
        for p in procs:
            p.start()
        deadline, failed_at, timed_out = time.monotonic() + timeout, None, False
        try:
            while any(p.exitcode is None for p in procs):
                left = deadline - time.monotonic()
                if failed_at is not None:
                    left = min(left, failed_at + GRACE_S - time.monotonic())
                if left <= 0:
                    timed_out = failed_at is None
                    break
                wait([p.sentinel for p in procs if p.exitcode is None], left)
                if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                    failed_at = time.monotonic()
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()
        out = "".join(open(o).read() for o, _ in paths)
        err = "".join(open(e).read() for _, e in paths)
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout, out, err)
    rc = next((p.exitcode for p in procs if p.exitcode != 0), 0)
    return subprocess.CompletedProcess(list(argv), rc, out, err)
