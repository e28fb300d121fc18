"""``megallama validate``: load a run config exactly as ``train`` would, check the layout and the
DeepSpeed config it would build; with ``--gpu``, the layout's predicted step and memory on that
GPU, refused when predicted not to fit (before anyone queues for the machines)."""
from __future__ import annotations

import json

NAME = "validate"
HELP = "check a run config (and its layout at a world size) without starting anything"


def add_arguments(p) -> None:
    p.add_argument("config", help="run-config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. model.n_layers=4 (repeatable)")
    p.add_argument("--world-size", type=int, default=None, help="check the layout at this many ranks")
    p.add_argument("--gpu", default=None, metavar="TYPE",
                   help="predict step time and per-rank memory on this GPU (e.g. h100-sxm, a100-80gb); "
                        "refuse a layout predicted not to fit it")
    p.add_argument("--fits-here", action="store_true",
                   help="also check the run fits this machine's memory, as train does at start-up")
    p.add_argument("--json", action="store_true", help="print the resolved config as JSON")


def run(args) -> int:
    from megallama.config import load_run_config
    from megallama.train.ds_config import build_ds_config
    from megallama.train.prediction import choose_micro_batch

    cfg = load_run_config(args.config, args.overrides)
    cfg.check_layout(args.world_size)   # a bad --world-size (0 included) is refused here, by name
    world = args.world_size or cfg.parallel.model_ranks
    hw = None
    if args.gpu is not None:
        from megallama.profiling.hardware import load_hardware

        hw = load_hardware(args.gpu)
    cfg, choice = choose_micro_batch(cfg, world, hw)
    build_ds_config(cfg, world)  # what train hands DeepSpeed
    if args.fits_here:  # only when asked: a 7B config validates on a laptop
        from megallama.train.fits import check_training_fits

        check_training_fits(cfg, world)
    if args.json:
        print(json.dumps(cfg.model_dump(), indent=2))
    else:
        dp = world // cfg.parallel.model_ranks
        b = cfg.train.batch_layout(dp)
        print(f"ok: {cfg.model.arch} dim={cfg.model.dim} layers={cfg.model.n_layers} at world={world} "
              f"(tp={cfg.parallel.tp} pp={cfg.parallel.pp}{_ulysses(cfg)} dp={dp}); global batch {b.global_} = "
              f"{b.micro} x {b.accum} x {dp}")
        if choice:
            print(choice)
    if hw is not None:
        _check_on_gpu(cfg, world, hw, quiet=args.json)
    return 0


def _check_on_gpu(cfg, world: int, hw, quiet: bool) -> None:
    """The prediction on ``hw``; a layout predicted not to fit is refused after its per-rank breakdown."""
    from megallama.errors import UserError
    from megallama.train.fits import fmt_bytes
    from megallama.train.prediction import predict_run, stage_breakdowns

    from megallama.train.prediction import run_layout

    p = predict_run(cfg, world, hardware=(hw, f"--gpu {hw.name}"))
    if p.fits:
        if not quiet:
            print(p.line())
        return
    print(f"predicted peak memory per rank on {hw.name}, by pipeline stage (capacity {fmt_bytes(p.capacity_bytes)}, "
          f"{p.capacity_source}):")
    for mem in stage_breakdowns(cfg, p.layout, run_layout(cfg, world)[1], "cuda"):
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.components.items() if v)
        print(f"  stage {mem.stage}: {fmt_bytes(mem.total)} = {parts}")
    overheads = {k: v for k, v in p.verdict.overheads.items() if v}
    if overheads:   # what the verdict adds to the counted tensors above (the total below includes it)
        print("  plus the device's overheads: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in overheads.items()))
    raise UserError(f"layout {p.layout.describe()} at world={world} is predicted not to fit "
                    f"{hw.name}: about {fmt_bytes(p.memory_bytes)} per rank (stage {p.memory.stage}) against "
                    f"{fmt_bytes(p.capacity_bytes)} usable; shard further (parallel.tp, parallel.pp, ZeRO stage), "
                    f"lower train.micro_batch_size, or set train.activation_checkpointing.mode")


def _ulysses(cfg) -> str:
    return f" ulysses={cfg.parallel.ulysses}" if cfg.parallel.ulysses > 1 else ""
