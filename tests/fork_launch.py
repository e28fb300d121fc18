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

Why a rank's end is not left to the fork server alone: CPython's server
(multiprocessing/forkserver.py) is the ranks' parent; it learns of an exit only through SIGCHLD (a
wakeup fd in its select loop), reaps with waitpid(-1, WNOHANG) and writes the status down the
caller's sentinel pipe, the caller's only word (``Process.exitcode`` stays None, ``join()`` waits
on that pipe without a bound). That loop does not lose an exit by itself (coalesced SIGCHLDs are
covered by the waitpid loop; our server has one thread and no signal blocked), so a report goes
missing when the server is not running its loop (stopped, or blocked in a request) or the rank
cannot be reaped yet (its exit held up, as by a core dump of an aborting rank): a CI run once
waited forever on a 2-rank run whose ranks were no longer listed by ps. So each rank writes its own
exit status, a rank the server says nothing of is read from that status or from its pid (/proc:
gone, or a zombie's exit code), and no wait is unbounded.
"""
from __future__ import annotations

import faulthandler
import glob
import importlib
import multiprocessing.process
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from typing import List, Optional, Sequence, Tuple

from megallama.train.comm_buffers import buffer_path
from tests.dist_utils import forkserver_context, free_port

GRACE_S = 10.0  # after the first rank fails, as a launcher waits before killing the rest
POLL_S = 0.5  # how often a rank's own status and its pid are looked at while the fork server says nothing
UNREPORTED_S = 2.0  # a rank gone (or a zombie) this long with no word from the fork server: it is read ourselves
EXIT_S = 5.0  # a rank that wrote its status (or was killed) and has not exited after this is given up on
LOST_RC = 255  # a rank gone with neither its own status nor the server's (multiprocessing's code for a lost server)


def _exit_code(code) -> int:
    """``sys.exit(code)``'s exit status, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return 1


def _rank_main(rank: int, world: Optional[int], port: int, module: str, argv: List[str], environ: dict, cwd: str,
               out_path: str, err_path: str, status_path: str) -> None:
    code = 1
    try:
        os.environ.clear()
        os.environ.update(environ)
        if world is not None:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.chdir(cwd)
        for fd, path in ((1, out_path), (2, err_path)):  # fd level: C code and loggers made at import write here too
            os.dup2(os.open(path, os.O_WRONLY), fd)
        faulthandler.enable()  # a rank that aborts or crashes leaves its Python stack in its stderr
        import torch

        # what torch read from the environment at import, in the server, read again from the caller's
        torch.set_num_threads(int(environ.get("OMP_NUM_THREADS", "1")))
        if "TORCH_LOGS" in environ:
            torch._logging._internal._init_logs()
        main = importlib.import_module("megallama.cli" if module == "megallama" else module).main
        code = _exit_code(main(argv))
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # The teardown multiprocessing would run after this target (joining threads and children),
        # then the rank's own word on how it ended, then an exit no later teardown can change.
        try:
            import threading
            from multiprocessing import util

            threading._shutdown()
            util._exit_function()
        except BaseException:
            traceback.print_exc()
            code = code or 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        with open(status_path + ".tmp", "w") as f:
            f.write(str(code))
        os.rename(status_path + ".tmp", status_path)
        os._exit(code)


def _proc_stat(pid: int) -> Optional[Tuple[str, str, Optional[int]]]:
    """``(state, start time, wait status or None)`` of ``pid`` from /proc, ``None`` if it is gone.
    A zombie's wait status is /proc/PID/stat's exit_code (Linux >= 3.5), readable by anyone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # no /proc (not Linux): only whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ("?", "", None)
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
    status = int(fields[49]) if fields[0] in "ZX" and len(fields) > 49 else None
    return fields[0], fields[19], status


class _Rank:
    """One forked rank, and how it ended: the fork server's report (``Process.exitcode``), else the
    rank's own status file, else what the kernel still shows of its pid."""

    def __init__(self, proc, status_path: str):
        self.proc, self.status_path = proc, status_path
        self.rc: Optional[int] = None
        self.note = ""
        self.gone_since: Optional[float] = None  # first seen gone or a zombie without any report
        self.stopped_at: Optional[float] = None  # when its status appeared, or it was killed

    def start(self) -> None:
        self.proc.start()
        stat = _proc_stat(self.proc.pid)
        self.start_time = stat[1] if stat else None

    def _own_status(self) -> Optional[int]:
        try:
            with open(self.status_path) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def _kernel(self):
        """``(gone, wait status)``: gone covers a zombie, and a reused pid."""
        stat = _proc_stat(self.proc.pid)
        if stat is None or (self.start_time and stat[1] and stat[1] != self.start_time):
            return True, None
        return stat[0] in "ZX", stat[2]

    def settle(self, now: float) -> bool:
        """Whether the rank has ended, setting ``rc`` (and ``note``) when it has. Never blocks."""
        if self.rc is not None:
            return True
        if self.proc.exitcode is not None:  # the fork server's report: the kernel's own word
            self.rc = self.proc.exitcode
            return True
        own = self._own_status()
        gone, status = self._kernel()
        if own is not None:
            self.stopped_at = self.stopped_at or now
            if gone or now - self.stopped_at >= EXIT_S:
                self.rc = own
                if not gone:
                    self.note = (f"rank pid {self.proc.pid} wrote exit status {own} but had not exited "
                                 f"{EXIT_S:.0f} s later; killed")
                    self.kill()
                return True
            return False
        if not gone:
            if self.stopped_at is not None and now - self.stopped_at >= EXIT_S:  # killed, and still not gone
                self.rc, self.note = LOST_RC, f"rank pid {self.proc.pid} did not exit {EXIT_S:.0f} s after SIGKILL"
                return True
            return False
        self.gone_since = self.gone_since or now
        if now - self.gone_since < UNREPORTED_S:  # the fork server's report may be on its way
            return False
        if status is not None:
            self.rc = os.waitstatus_to_exitcode(status)
            self.note = (f"rank pid {self.proc.pid} exited ({self.rc}) without writing its status, and the "
                         f"fork server did not reap it within {UNREPORTED_S:.0f} s")
        else:
            self.rc = LOST_RC
            self.note = (f"rank pid {self.proc.pid} is gone without writing its status, and the fork server "
                         f"reported no exit for it within {UNREPORTED_S:.0f} s: it died before its status "
                         f"(killed, or aborted in C code), exit status unknown")
        return True

    def kill(self) -> None:
        gone, _ = self._kernel()
        if not gone:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stopped_at = self.stopped_at or time.monotonic()


def _remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce buffers of a run on ``port`` (/dev/shm, ~67 MB of RAM a rank)
    that a rank killed during start-up, before ``comm_buffers.release_after_start``, left: named
    by the run's MASTER_ADDR and MASTER_PORT, ours alone."""
    for path in glob.glob(str(buffer_path("*", {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))):
        try:
            os.unlink(path)
        except OSError:
            pass


def run_forked(argv: Sequence[str], world: Optional[int], environ: dict, cwd, timeout: float,
               module: str = "megallama") -> subprocess.CompletedProcess:
    """Like ``subprocess.run`` of a launcher with ``world`` local ranks (``None``: one process
    without a launcher's variables, as a plain ``megallama ...``): the first non-zero rank exit
    code (or 0), and every rank's stdout and stderr, in rank order. ``module``: one with a
    ``main(argv)``, as ``python -m MODULE ARGV`` would run. Returns or raises within about
    ``timeout`` + ``GRACE_S`` + ``EXIT_S`` + ``UNREPORTED_S`` s, whatever the fork server does."""
    ctx = forkserver_context()
    port = free_port()
    n = world or 1
    with tempfile.TemporaryDirectory(prefix="megallama-ranks-") as tmp:
        paths = [(os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")) for r in range(n)]
        for path in (p for pair in paths for p in pair):  # there to read even if a rank dies before it writes
            open(path, "w").close()
        ranks = [_Rank(ctx.Process(target=_rank_main, args=(r, world, port, module, list(argv), dict(environ),
                                                             str(cwd), *paths[r], os.path.join(tmp, f"{r}.status"))),
                       os.path.join(tmp, f"{r}.status")) for r in range(n)]
        deadline, failed_at, timed_out, killed = time.monotonic() + timeout, None, False, False
        try:
            for rank in ranks:
                rank.start()
            while True:
                now = time.monotonic()
                running = [r for r in ranks if not r.settle(now)]
                if not running:
                    break
                if failed_at is None and any(r.rc not in (None, 0) for r in ranks):
                    failed_at = now
                if not killed and (now >= deadline or (failed_at is not None and now >= failed_at + GRACE_S)):
                    timed_out, killed = failed_at is None, True
                    for r in running:  # from here each settles within EXIT_S, or UNREPORTED_S if unreported
                        r.kill()
                # bounded: the fork server's report wakes it at once; without one, the next look is POLL_S on
                wait([r.proc.sentinel for r in running if r.proc.exitcode is None], POLL_S)
        finally:
            for r in ranks:  # whatever was raised, no rank is left running
                if r.proc._popen is not None and r.rc is None and r.proc.exitcode is None:
                    r.kill()
                # A rank the fork server never reported stays among multiprocessing's children, whose
                # exit handler join()s each without a bound: pytest would hang at exit instead.
                if r.proc._popen is not None and r.proc.exitcode is None:
                    multiprocessing.process._children.discard(r.proc)
            if world is not None:
                _remove_shm_buffers(port)
        out = "".join(open(o).read() for o, _ in paths)
        err = "".join(open(e).read() for _, e in paths)
    err += "".join(f"tests.fork_launch: rank {i}: {r.note}\n" for i, r in enumerate(ranks) if r.note)
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout, out, err)
    rc = next((r.rc for r in ranks if r.rc != 0), 0)
    return subprocess.CompletedProcess(list(argv), rc, out, err)
