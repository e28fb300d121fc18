"""``megallama train CONFIG.yaml [--set key=value ...]``: the main job, under any launcher."""
from __future__ import annotations

import sys

from megallama.errors import PREEMPTED_EXIT

NAME = "train"
HELP = "train a model from a run config (single process, deepspeed, torchrun, mpiexec or srun)"


def add_arguments(p) -> None:
    p.add_argument("config", help="run-config YAML (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. parallel.tp=2 or deepspeed.zero_optimization.stage=3")


def run(args) -> int:
    from megallama.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    cfg.check_layout()
    from megallama.train.loop import train

    report = train(cfg)
    import torch.distributed as dist

    from megallama.train.distributed import finish_distributed

    if report and (not dist.is_initialized() or dist.get_rank() == 0):
        mem = (report["mem_bytes"] or 0) / 2**30
        end, steps = report["end_step"], report["steps"]
        head = f"done: step {end} of {steps}" if end == steps else \
            f"stopped at step {end} of {steps} (train.exit_at_step={end})"
        if report["preempted"]:
            head = (f"{report['preempted']}: stopped at step {end} of {steps}, checkpoint step "
                    f"{report['checkpoint_step']}, steps lost {report['steps_lost']}; exit {PREEMPTED_EXIT}: "
                    "the same command resumes")
        sys.stdout.write(
            f"{head}, loss {report['first_loss']:.3f} -> {report['final_loss']:.3f}; "
            f"{report['tokens_per_s'] or 0:,.0f} tok/s, {report['tflops_per_rank'] or 0:.3f} TFLOP/s per rank, "
            f"MFU {100 * (report['mfu'] or 0):.1f}%, peak mem {mem:.2f} GiB per rank; metrics in {report['metrics']}\n")
    finish_distributed()
    return PREEMPTED_EXIT if report and report["preempted"] else 0
