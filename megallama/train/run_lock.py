"""One job per run directory, and directories that can be written, checked before anything is.

Rank 0 holds ``fcntl.flock`` on ``RUN_DIR/.lock`` for the whole run: a second job started on the
same directory would interleave ``metrics.jsonl``, overwrite checkpoints and read the first job's
heartbeats as its own, so it is refused in one line naming the holder. A flock dies with its
process, so the lock of a killed run is taken over without asking. Only rank 0 locks and only its
host's directory counts: with node-local run directories the other nodes hold nothing a second job
could collide on. The same start-up check turns a run or checkpoint directory that is empty, under
a file, or not writable into one line instead of a traceback at the first write.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

from megallama.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def _blocking_file(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` (or ``path``) that is not a directory."""
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def ensure_dir(path, field: str) -> bool:
    """Create ``path`` if needed and prove it writable; a one-line UserError naming ``field`` if not.
    Returns whether this call created it."""
    if not str(path).strip():
        raise UserError(f"{field}: empty; expected a directory path (an empty one would write into the current "
                        "directory)")
    p = Path(path)
    existed = p.is_dir()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _blocking_file(p)
        raise UserError(f"{field}: {p}: {blocker or p} is a file, not a directory") from None
    except OSError as exc:
        raise UserError(f"{field}: {p}: cannot create it ({exc.strerror or exc})") from None
    probe = p / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{field}: {p}: not writable ({exc.strerror or exc})") from None
    return not existed


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f" (pid {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class RunLock:
    """An exclusive flock on ``RUN_DIR/.lock``; the file names its holder for a refused second job."""

    def __init__(self, run_dir: Path, created_dir: bool):
        self.path = run_dir / LOCK_NAME
        self.run_dir, self.created_dir = run_dir, created_dir
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"run_dir: {self.path}: cannot open the run lock ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"run_dir: {self.run_dir} is in use by another run{_holder(self.path)}; "
                                    "wait for it to end or choose another run_dir") from None
                log.warning("run_dir: %s: cannot lock it (%s); a second job on this directory would not be "
                            "refused", self.path, exc.strerror or exc)
                return self
            try:  # the previous holder may have unlinked the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        left = _holder(self.path)
        if left:  # a released lock is unlinked, so a named holder was killed before it could release
            log.info("run_dir: taking over the lock left by a run that no longer runs%s", left)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        return self

    def release(self) -> None:
        """Unlink while still holding the lock (see the inode check in ``acquire``); remove the run
        directory too if this run created it and left nothing in it (a start that failed)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:  # not empty: the run wrote something worth keeping
                pass


def hold_run_dir(run_dir: str, ckpt_dir: Optional[str], check_ckpt_dir: bool) -> Optional[RunLock]:
    """Collective: rank 0 checks the directories and takes the lock; every rank gets its verdict.
    ``ckpt_dir``: an explicit ``checkpoint.dir`` (the default lies inside the run directory)."""
    from megallama.train.distributed import on_rank0_then_share

    held: List[RunLock] = []

    def take() -> None:
        lock = RunLock(Path(run_dir), ensure_dir(run_dir, "run_dir")).acquire()
        held.append(lock)
        if check_ckpt_dir and ckpt_dir is not None:
            try:
                ensure_dir(ckpt_dir, "checkpoint.dir")
            except UserError:
                held.pop().release()
                raise

    on_rank0_then_share(take)
    return held[0] if held else None
