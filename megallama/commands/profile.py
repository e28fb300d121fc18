"""``megallama profile CONFIG --steps N``: a real measured run under any launcher, reported as
JSON beside the planner's prediction for the same layout. Steps run at the full global batch: a
``train.rampup_batch_size`` is reported as not applied (:func:`ramp_statement`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAME = "profile"
HELP = ("measure a run (tokens/s, TFLOP/s, MFU/HFU, peak memory, communication share, pipeline bubble) "
        "beside the planner's prediction; any launcher")

GiB = 2 ** 30


def add_arguments(p) -> None:
    p.add_argument("config", help="run-config YAML (see examples/)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. parallel.tp=2")
    p.add_argument("--no-census", action="store_true",
                   help="skip the extra byte-counting step (saved activations, model states, collectives)")
    p.add_argument("--no-comm-timing", action="store_true",
                   help="time steps bare (on GPU, timing collectives synchronises the device around each)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from megallama.config import load_run_config
    from megallama.errors import UserError

    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    cfg = load_run_config(args.config, args.overrides)
    from megallama.profiling.harness import profile

    report = profile(cfg, args.steps, args.warmup, with_census=not args.no_census,
                     comm_timing=not args.no_comm_timing)
    from megallama.train.distributed import finish_distributed

    if report is not None:
        report["command"] = "megallama profile " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["profile"] else
                                                            [args.config])
        if cfg.train.rampup_batch_size is not None:
            report["batch_ramp"] = ramp_statement(cfg.train)
        out = Path(cfg.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(report, indent=2, default=str))
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_text(report)
    finish_distributed()
    return 0


def ramp_statement(t) -> dict:
    """What profile does with ``train.rampup_batch_size``, said outright: every step, warm-up and
    timed, runs at the full global batch (the engine's as built; nothing here moves it), because
    the figures are the steady state the planner predicts, and a ramp lasts only its first samples."""
    return {"rampup_batch_size": list(t.rampup_batch_size), "applied": False, "global_batch": t.global_batch_size,
            "note": f"measured at the full global batch {t.global_batch_size} every step; train.rampup_batch_size "
                    f"{list(t.rampup_batch_size)} is not applied (profile measures the steady state, which train "
                    f"reaches after the ramp's {t.rampup_batch_size[2]} samples)"}


def _fmt(v, scale=1.0, spec="{:.3g}") -> str:
    return "n/a" if v is None else spec.format(v * scale)


def _print_text(r) -> None:
    m, p = r["measured"], r["predicted"]
    print(f"{r['model']} on {r['world_size']} x {r['device']} ({r['launcher']}): {r['describe']}, seq {r['seq']}, "
          f"{r['steps']} timed steps after {r['warmup_steps']} warm-up")
    if r.get("batch_ramp"):
        print(f"  {r['batch_ramp']['note']}")
    print(f"  {'':26s} {'measured':>12s} {'predicted':>12s}")
    rows = [("tokens/s", "tokens_per_s", 1, "{:,.0f}"), ("TFLOP/s per GPU (model)", "tflops_per_gpu", 1, "{:.4f}"),
            ("MFU", "mfu", 100, "{:.2f}%"), ("HFU", "hfu", 100, "{:.2f}%"),
            ("peak memory (GiB)", "peak_memory_bytes", 1 / GiB, "{:.3f}"),
            ("communication share", "comm_share", 100, "{:.1f}%"),
            ("pipeline bubble", "pipeline_bubble", 100, "{:.1f}%"),
            ("step time (s)", "step_time_s", 1, "{:.4f}")]
    for label, key, scale, spec in rows:
        print(f"  {label:26s} {_fmt(m.get(key), scale, spec):>12s} {_fmt(p.get(key), scale, spec):>12s}")
    print(f"  peak memory measured as: {m['peak_memory_source']}; bubble: {r['pipeline_bubble']['source']}")
    worst = r.get("model_check_worst_error")
    if worst:
        print("  cost models vs this run's census (worst relative error over ranks):")
        for name, err in worst.items():
            print(f"      {name:40s} {'measured 0' if err is None else f'{100 * err:+.2f}%'}")
