"""``megallama`` entry point. Each sub-command is a module in ``megallama.commands`` defining
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; they are discovered, so a
new command is a new file and nothing else."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import time
from typing import List, Optional

from megallama.errors import UserError

NATIVE_GRACE_S = 10.0  # for a watchdog store request still out at exit to come back


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump) and exits 2, and takes no
    abbreviations: ``estimate --gpus 8`` is an error, not ``--gpus-per-node 8``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _commands():
    import megallama.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"megallama.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megallama", description="Train, convert, plan and profile LLaMA models.")
    # the deepspeed launcher appends --local_rank=N right after the module name
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _release_process_group() -> None:
    """A command that fails after start-up tears its process group down here, not at interpreter
    exit, where destroying gloo's threads in arbitrary order can abort the process
    ("terminate called without an active exception") instead of exiting with 2."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already broken (a peer died): exiting is all that is left
            pass


def _prints_error(exc: UserError) -> bool:
    """Whether this process prints an error every rank raises alike (a bad config, a verdict rank 0
    broadcast): local rank 0 of each node does, so a launcher's log shows it once per node, not
    once per rank. Errors of one rank's own (a dead peer, a failed write) are printed by each."""
    from megallama.config.schema import ConfigError

    if not (isinstance(exc, ConfigError) or getattr(exc, "same_on_every_rank", False)):
        return True
    env = os.environ
    if not any(env.get(k, "").strip().isdigit() and int(env[k]) > 1
               for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")):
        return True  # one process (a stray LOCAL_RANK in the shell must not silence it)
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(key, "").strip().isdigit():
            return int(env[key]) == 0
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        if _prints_error(exc):
            sys.stderr.write(f"megallama {args.command}: error: {exc}\n")
        else:  # a launcher kills the siblings of the first rank to exit: let the one that says it go first
            time.sleep(1.0)
        _release_process_group()
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"megallama {args.command}: interrupted\n")
        _release_process_group()
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run() -> None:
    """The process entry (``megallama``, ``python -m megallama``): ``main``, then an exit that no
    thread left inside a native call can turn into an abort (``native_calls``): such calls get
    ``NATIVE_GRACE_S`` to come back, and a process with one still out ends without finalizing."""
    end_process(main())


def end_process(code: int, grace_s: float = NATIVE_GRACE_S) -> None:
    from megallama.native_calls import settled

    if settled(grace_s):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
