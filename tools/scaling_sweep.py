#!/usr/bin/env python
"""Scaling curves: tokens/s per GPU, MFU and memory per GPU against cluster size.

    .venv/bin/python tools/scaling_sweep.py --predicted --out runs/scaling [--gpu a100-80gb]
        [--models llama-7b,llama-13b,llama-33b,llama-65b] [--sizes 8,16,...,4096]
        [--seq 2048] [--global-batch-tokens 4194304]
    .venv/bin/python tools/scaling_sweep.py --measured --out runs/scaling [--steps 5] [--layouts dp1,dp2,...]
    .venv/bin/python tools/scaling_sweep.py --from-runs runs/scaling/measured_runs --out runs/scaling

``--predicted``: for every model and cluster size, the planner's best layout (the one it ranks
first among those that fit); writes ``scaling_predicted.csv`` and three PNGs into ``--out``.

``--measured``: what this machine can run -- 1, 2 and 4 ranks, DP/TP/PP variants of the tiny
model (``LAYOUTS``), each a real ``megallama profile`` run (torchrun; one process without a
launcher), one core per rank. Each layout gives two rows, ``measured`` and ``predicted`` (the
planner's figures for that exact layout on the measured ``cpu`` profile), written to
``scaling_measured.csv`` beside the predicted sweep, and ``scaling_measured.png`` draws them side
by side. ``--from-runs DIR`` reads the ``profile.json`` files of earlier runs instead
(:func:`load_measured`).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = "llama-7b,llama-13b,llama-33b,llama-65b,llama2-70b"
DEFAULT_SIZES = ",".join(str(2 ** k) for k in range(3, 13))       # 8 ... 4096
FIELDS = ["source", "model", "gpus", "gpu", "seq", "tp", "pp", "dp", "zero", "mbs", "grad_accum", "recompute",
          "sp", "offload", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "memory_per_gpu_gib", "step_time_s",
          "note"]
PLOTS = {"tokens_per_s_per_gpu": "tokens/s per GPU", "mfu": "MFU", "memory_per_gpu_gib": "memory per GPU (GiB)"}


def predicted_rows(models: List[str], sizes: List[int], gpu: str, seq: Optional[int],
                   batch_tokens: Optional[int]) -> List[Dict[str, object]]:
    from megallama.errors import UserError
    from megallama.profiling.arch import as_spec
    from megallama.profiling.hardware import load_hardware
    from megallama.profiling.planner import plan

    hw = load_hardware(gpu)
    rows = []
    for name in models:
        spec = as_spec(name)
        for n in sizes:
            row: Dict[str, object] = {"source": "predicted", "model": name, "gpus": n, "gpu": hw.name,
                                      "seq": seq or spec.max_seq_len}
            try:
                best = plan(spec, n, hw, seq=seq, batch_tokens=batch_tokens).best
            except UserError as exc:
                rows.append({**row, "note": str(exc)})
                print(f"{name:11s} {n:5d} GPUs: {exc}", flush=True)
                continue
            lay = best.layout
            row.update(tp=lay.tp, pp=lay.pp, dp=lay.dp, zero=lay.zero, mbs=lay.mbs, grad_accum=lay.grad_accum,
                       recompute=lay.recompute, sp=lay.sp, offload=lay.offload,
                       tokens_per_s_per_gpu=round(best.tokens_per_s_per_gpu, 1),
                       tflops_per_gpu=round(best.tflops_per_gpu, 1), mfu=round(best.mfu, 4),
                       memory_per_gpu_gib=round(best.memory.total / 2 ** 30, 2),
                       step_time_s=round(best.step_time_s, 3), note="")
            rows.append(row)
            print(f"{name:11s} {n:5d} GPUs: {lay.describe():50s} {best.tokens_per_s_per_gpu:8.0f} tok/s/GPU "
                  f"MFU {best.mfu:.1%} {best.memory.total / 2 ** 30:6.1f} GiB", flush=True)
    return rows


# name -> (ranks, run-config overrides); every layout runs 16 sequences of 128 tokens per step
LAYOUTS = {
    "dp1": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp4": (4, []),
    "tp2dp2": (4, ["parallel.tp=2"]),
    "pp2dp2": (4, ["parallel.pp=2"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}
MEASURED_FIELDS = ["layout"] + FIELDS[:-1] + ["hfu", "comm_share", "pipeline_bubble", "tokens_per_s", "note"]
SWEEP_CONFIG = {
    "model": {"preset": "tiny"},
    "train": {"steps": 100, "seed": 7, "seq_len": 128, "micro_batch_size": 4, "global_batch_size": 16,
              "lr": 2.0e-3, "warmup_steps": 1, "log_every": 1},
    "checkpoint": {"every": 0},
    "deepspeed": {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5000000, "allgather_bucket_size": 5000000}},
}


def run_measured(out: Path, names: List[str], steps: int, warmup: int, timeout: int = 900) -> Path:
    """One ``megallama profile`` run per layout; their ``profile.json`` land in ``out/<layout>/``."""
    import json
    import os
    import socket
    import subprocess

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config = out / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP_CONFIG, "run_dir": str(out / "run"),
                                      "data": {"cache_dir": str(out / "data_cache"), "embedded_max_files": 40}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in names:
        ranks, overrides = LAYOUTS[name]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launch = [sys.executable, "-m", "megallama"] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
            "-m", "megallama"]
        args = ["profile", str(config), "--steps", str(steps), "--warmup", str(warmup),
                "--set", f"run_dir={out / name}"]
        args += [x for o in overrides for x in ("--set", o)]
        print(f"{name:8s} {' '.join(launch[2:4] if ranks > 1 else launch[1:3])} x{ranks}: ", end="", flush=True)
        proc = subprocess.run(launch + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        if proc.returncode != 0:
            print("failed")
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "error.txt").write_text(proc.stdout[-5000:] + proc.stderr[-20000:])
            continue
        r = json.loads((out / name / "profile.json").read_text())
        (out / name / "command.txt").write_text(" ".join(["OMP_NUM_THREADS=1"] + launch + args) + "\n")
        print(f"{r['tokens_per_s']:9,.0f} tok/s (predicted {r['predicted'].get('tokens_per_s', 0):9,.0f}), "
              f"MFU {r['mfu']:.1%}, comm {r['comm_share'] or 0:.0%}", flush=True)
    return out


def load_measured(path: Path) -> List[Dict[str, object]]:
    """Rows from every ``profile.json`` under ``path`` (``megallama profile`` runs): for each run
    one ``measured`` row and one ``predicted`` row (the planner's figures for that layout), in the
    ``MEASURED_FIELDS`` schema."""
    import json

    rows: List[Dict[str, object]] = []
    for f in sorted(Path(path).rglob("profile.json")):
        r = json.loads(f.read_text())
        lay = r["layout"]
        base = {"layout": f.parent.name, "model": "tiny", "gpus": r["world_size"], "gpu": "cpu", "seq": r["seq"],
                **{k: lay[k] for k in ("tp", "pp", "dp", "zero", "mbs", "grad_accum", "recompute", "sp", "offload")}}
        for source, d in (("measured", r["measured"]), ("predicted", r["predicted"])):
            if not d:
                continue
            mem = d.get("peak_memory_bytes")
            rows.append({**base, "source": source, "tokens_per_s": _round(d.get("tokens_per_s"), 1),
                         "tokens_per_s_per_gpu": _round(d.get("tokens_per_s_per_gpu"), 1),
                         "tflops_per_gpu": _round(d.get("tflops_per_gpu"), 5), "mfu": _round(d.get("mfu"), 4),
                         "hfu": _round(d.get("hfu"), 4),
                         "memory_per_gpu_gib": _round(mem / 2 ** 30 if mem else None, 4),
                         "step_time_s": _round(d.get("step_time_s"), 4), "comm_share": _round(d.get("comm_share"), 4),
                         "pipeline_bubble": _round(d.get("pipeline_bubble"), 4),
                         "note": d.get("peak_memory_source", "") if source == "measured" else ""})
    return rows


def _round(x, n):
    return None if x is None else round(float(x), n)


def write_csv(rows: List[Dict[str, object]], path: Path, fields: Optional[List[str]] = None) -> None:
    fields = fields or FIELDS
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def _ranks(rows: List[Dict[str, object]], layout: str) -> str:
    n = next(int(r["gpus"]) for r in rows if r["layout"] == layout)
    return f"{n} rank" + ("s" if n > 1 else "")


def plot_measured(rows: List[Dict[str, object]], out: Path) -> Path:
    """Measured beside predicted, per layout (grouped bars): tokens/s per rank, MFU, memory per rank."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(str(r["layout"]) for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label) in zip(axes, PLOTS.items()):
        for i, (source, color) in enumerate((("measured", "C0"), ("predicted", "C1"))):
            vals = {str(r["layout"]): r.get(key) for r in rows if r["source"] == source}
            xs = [j + (i - 0.5) * 0.38 for j in range(len(names))]
            ax.bar(xs, [float(vals.get(n) or 0.0) for n in names], width=0.38, color=color, label=source)
        ax.set_xticks(range(len(names)),
                      [f"{n}\n({_ranks(rows, n)})" for n in names], fontsize=8)
        ax.set_ylabel(label.replace("GPU", "rank"))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny model on this CPU ({os.cpu_count()} cores, one thread per rank): measured runs beside the "
                 "planner's prediction for the same layout")
    fig.tight_layout()
    path = out / "scaling_measured.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: List[Dict[str, object]], out: Path, gpu: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    for key, label in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, model in enumerate(models):
            color = f"C{i}"
            for source, style in (("predicted", dict(marker="o", linestyle="-")),
                                  ("measured", dict(marker="x", linestyle="none", markersize=9))):
                pts = [(int(r["gpus"]), float(r[key])) for r in rows
                       if r["model"] == model and r["source"] == source and r.get(key) not in (None, "")]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, color=color, label=f"{model} ({source})", **style)
        ax.set_xscale("log", base=2)
        sizes = sorted({int(r["gpus"]) for r in rows})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs cluster size, best planner layout, {gpu}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"scaling_{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--predicted", action="store_true", help="planner predictions, 8-4096 GPUs (the analytic half)")
    ap.add_argument("--measured", action="store_true", help="run the local sweep (1, 2, 4 ranks; tiny model)")
    ap.add_argument("--from-runs", type=Path, default=None, help="read profile.json files of earlier runs")
    ap.add_argument("--out", type=Path, required=True, help="output directory for CSV and PNGs")
    ap.add_argument("--gpu", default="a100-80gb")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--global-batch-tokens", type=int, default=None)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="measured layouts to run")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measured run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per measured run")
    args = ap.parse_args(argv)
    if not (args.predicted or args.measured or args.from_runs):
        ap.error("give --predicted, --measured or --from-runs DIR")
    unknown = [n for n in args.layouts.split(",") if n not in LAYOUTS]
    if unknown:
        ap.error(f"--layouts: unknown layout '{unknown[0]}' (known: {', '.join(LAYOUTS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.predicted:
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = predicted_rows(args.models.split(","), sizes, args.gpu, args.seq, args.global_batch_tokens)
        csv_path = args.out / "scaling_predicted.csv"
        write_csv(rows, csv_path)
        pngs = plot(rows, args.out, args.gpu)   # rows where nothing fits have no values and are skipped
        print(f"wrote {csv_path} and {', '.join(p.name for p in pngs)}")
    if args.measured or args.from_runs:
        runs = args.from_runs or run_measured(args.out / "measured_runs", args.layouts.split(","), args.steps,
                                              args.warmup)
        rows = load_measured(runs)
        if not rows:
            print(f"scaling_sweep: error: no profile.json under {runs}", file=sys.stderr)
            return 2
        order = {n: i for i, n in enumerate(LAYOUTS)}
        rows.sort(key=lambda r: (order.get(str(r["layout"]), 99), str(r["source"])))
        csv_path = args.out / "scaling_measured.csv"
        write_csv(rows, csv_path, MEASURED_FIELDS)
        print(f"wrote {csv_path} and {plot_measured(rows, args.out).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
