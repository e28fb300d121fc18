#!/usr/bin/env python
"""Scaling curves: tokens/s per GPU, MFU and memory per GPU against cluster size.

    .venv/bin/python tools/scaling_sweep.py --predicted --out runs/scaling [--gpu a100-80gb]
        [--models llama-7b,llama-13b,llama-33b,llama-65b] [--sizes 8,16,...,4096]
        [--seq 2048] [--global-batch-tokens 4194304]

``--predicted``: for every model and cluster size, the planner's best layout (the one it ranks
first among those that fit); writes ``scaling_predicted.csv`` and three PNGs into ``--out``.

``--measured`` is the hook for the measured half (issue 6, part 7): rows read from real runs,
in the same CSV schema (``FIELDS``), drawn as markers over the predicted lines. It is not
implemented yet; :func:`load_measured` documents what it should return.
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


def load_measured(path: Path) -> List[Dict[str, object]]:
    """Part 7's measured half goes here: read real runs (e.g. each run's ``metrics.jsonl`` plus its
    layout) and return rows with ``source="measured"`` in the ``FIELDS`` schema, so ``plot`` draws
    them over the predicted curves and the CSV holds both side by side."""
    raise NotImplementedError("the measured half of the scaling sweep is not implemented yet (issue 6, part 7)")


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predicted", action="store_true", help="planner predictions (the analytic half)")
    ap.add_argument("--measured", type=Path, default=None, help="runs to overlay (not implemented yet)")
    ap.add_argument("--out", type=Path, required=True, help="output directory for CSV and PNGs")
    ap.add_argument("--gpu", default="a100-80gb")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--global-batch-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    if not (args.predicted or args.measured):
        ap.error("give --predicted (and later --measured RUNS)")
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: List[Dict[str, object]] = []
    if args.predicted:
        rows += predicted_rows(args.models.split(","), sizes, args.gpu, args.seq, args.global_batch_tokens)
    if args.measured:
        try:
            rows += load_measured(args.measured)
        except NotImplementedError as exc:
            print(f"scaling_sweep: error: {exc}", file=sys.stderr)
            return 2
    csv_path = args.out / ("scaling_predicted.csv" if not args.measured else "scaling.csv")
    write_csv(rows, csv_path)
    pngs = plot(rows, args.out, args.gpu)   # rows where nothing fits have no values and are skipped
    print(f"wrote {csv_path} and {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
