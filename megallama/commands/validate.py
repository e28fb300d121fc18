"""``megallama validate``: load a run config exactly as ``train`` would, check the layout and the
DeepSpeed config it would build."""
from __future__ import annotations

import json

NAME = "validate"
HELP = "check a run config (and its layout at a world size) without starting anything"


def add_arguments(p) -> None:
    p.add_argument("config", help="run-config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. model.n_layers=4 (repeatable)")
    p.add_argument("--world-size", type=int, default=None, help="check the layout at this many ranks")
    p.add_argument("--fits-here", action="store_true",
                   help="also check the run fits this machine's memory, as train does at start-up")
    p.add_argument("--json", action="store_true", help="print the resolved config as JSON")


def run(args) -> int:
    from megallama.config import load_run_config

    from megallama.train.ds_config import build_ds_config

    cfg = load_run_config(args.config, args.overrides)
    cfg.check_layout(args.world_size)
    build_ds_config(cfg, args.world_size or cfg.parallel.model_ranks)  # what train hands DeepSpeed
    if args.fits_here:  # only when asked: a 7B config validates on a laptop
        from megallama.train.fits import check_training_fits

        check_training_fits(cfg, args.world_size or cfg.parallel.model_ranks)
    if args.json:
        print(json.dumps(cfg.model_dump(), indent=2))
    else:
        world = args.world_size or cfg.parallel.model_ranks
        dp = world // cfg.parallel.model_ranks
        b = cfg.train.batch_layout(dp)
        print(f"ok: {cfg.model.arch} dim={cfg.model.dim} layers={cfg.model.n_layers} at world={world} "
              f"(tp={cfg.parallel.tp} pp={cfg.parallel.pp}{_ulysses(cfg)} dp={dp}); global batch {b.global_} = "
              f"{b.micro} x {b.accum} x {dp}")
    return 0


def _ulysses(cfg) -> str:
    return f" ulysses={cfg.parallel.ulysses}" if cfg.parallel.ulysses > 1 else ""
