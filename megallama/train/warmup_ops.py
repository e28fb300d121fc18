"""Build DeepSpeed's JIT ops once, before any ranks start (two ranks building at once can abort),
and never wait forever on a build lock an interrupted build left behind.

torch's JIT loader takes ``BUILD_DIR/lock`` (a bare file, no owner recorded) even when the op is
already built, and waits for it to disappear with no timeout; a build killed mid-way (SIGKILL, an
OOM kill, a scheduler's time limit) leaves it, and every later run hangs silently.
:func:`check_build_lock` waits only while a build is visibly running (a process working in the
build directory) and otherwise reports the stale lock in one line naming it.

Run as ``python -m megallama.train.warmup_ops``; ``make`` does it after installing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from megallama.errors import UserError

OP = "ShareMemCommBuilder"  # the one op DeepSpeed's comm layer JIT-loads on CPU
GRACE_S = 30.0  # a live build sits in Python (not yet or no longer in ninja) for well under this


def _jit_builder():
    """DeepSpeed's builder of the comm op when it would be JIT-built here, else None."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except Exception:  # deepspeed not importable: nothing to build
        return None
    builder = get_accelerator().create_op_builder(OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return None if installed_ops.get(builder.NAME, False) else builder


def use_this_interpreters_ninja() -> None:
    """Put the ninja installed beside this interpreter first on PATH. torch runs whichever
    ``ninja`` PATH finds, and two ninja versions (a venv's and the system's) each take the
    other's build log as out of date: ranks started without the venv on PATH (over ssh, under
    ``mpiexec``) would rebuild the shared op back and forth, minutes each time."""
    here = Path(sys.executable).parent
    if (here / "ninja").is_file() and os.environ.get("PATH", "").split(os.pathsep)[0] != str(here):
        os.environ["PATH"] = str(here) + os.pathsep + os.environ.get("PATH", "")


def build_lock_path(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, False)) / "lock"


def _builders(build_dir: Path) -> list:
    """Pids on this host working in ``build_dir`` (ninja and the compilers run there)."""
    found, target = [], os.path.realpath(build_dir)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:  # gone, or another user's
                continue
            if cwd == target or cwd.startswith(target + os.sep):
                found.append(int(entry.name))
    return found


def _holders(lock: Path) -> list:
    """Pids on this host with ``lock`` open: torch's baton keeps its descriptor until it releases,
    so a holder that is alive but slow (a loaded machine) is told apart from a dead one."""
    found, target = [], os.path.realpath(lock)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fds = os.scandir(f"/proc/{entry.name}/fd")
            except OSError:
                continue
            with fds:
                for fd in fds:
                    try:
                        if os.readlink(fd.path) == target:
                            found.append(int(entry.name))
                            break
                    except OSError:
                        continue
    return found


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _last_change(build_dir: Path) -> float:
    """Newest mtime in the build directory (the lock, objects, the library, ninja's logs)."""
    newest = 0.0
    for entry in os.scandir(build_dir):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            pass
    return newest


def check_build_lock(lock: Path, grace_s: float = GRACE_S, say=_say) -> None:
    """Return once ``lock`` is gone; wait while a process on this host holds it open or builds;
    raise a one-line UserError naming ``lock`` once none has and nothing there has changed for
    ``grace_s`` (a live build holds the lock a moment before its compiler starts
    and after its linker ends, with fresh files around it then)."""
    told, last_seen = False, 0.0
    while True:
        if not lock.exists():
            return
        running = _holders(lock) or _builders(lock.parent)
        now = time.time()
        if running:
            last_seen = now
        try:  # the lock's own age first: one released and taken again between two looks is fresh
            quiet = now - max(last_seen, lock.stat().st_mtime, _last_change(lock.parent))
        except FileNotFoundError:
            return
        if quiet >= grace_s:
            err = UserError(f"{lock}: a DeepSpeed op build lock that no process on this host holds, nothing "
                            f"changed there for {quiet:.0f}s (left by an interrupted build); remove the file and start "
                            "again (if another host shares this directory and is building, wait for it instead)")
            err.same_on_every_rank = True
            raise err
        if running and not told and _age(lock) >= grace_s:
            say(f"waiting for the DeepSpeed op build in {lock.parent} (pid {running[0]}) to finish")
            told = True
        time.sleep(0.5)


def check_comm_op_lock() -> None:
    """Before anything JIT-loads DeepSpeed's comm op: a stale build lock is an error, not a hang."""
    builder = _jit_builder()
    if builder is not None:
        use_this_interpreters_ninja()
        check_build_lock(build_lock_path(builder.NAME))


def warmup() -> int:
    builder = _jit_builder()
    if builder is None:
        print("warmup_ops: nothing to build (no JIT-built shared-memory comm op for this accelerator)")
        return 0
    use_this_interpreters_ninja()
    try:
        check_build_lock(build_lock_path(builder.NAME))
    except UserError as exc:
        print(f"warmup_ops: error: {exc}", file=sys.stderr)
        return 2
    builder.load()
    print(f"warmup_ops: {builder.absolute_name()} ready")
    return 0


if __name__ == "__main__":
    sys.exit(warmup())
