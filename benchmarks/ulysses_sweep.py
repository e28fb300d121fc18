#!/usr/bin/env python
"""Predicted long-sequence training with and without Ulysses, and the model against published runs.

Three parts, all cost-model predictions (no GPU needed):

1. Sweep of sequence length 8K..128K for llama3-8b on one H100 node (8 GPUs) and llama3-70b on
   eight (64 GPUs), 4M-token batches: the planner's best layout with Ulysses searched, and its
   best with ``ulysses: 1`` (TP/PP/DP/ZeRO only). -> ``results/ulysses_sweep.csv``, ``.png``.
2. DeepSpeed-Ulysses' published throughput (blog figures 3 and 4) against the planner's
   prediction for the same system, model and GPU count. -> ``results/ulysses_vs_published.csv``.
3. Llama 3 405B's context-parallel run (TP8 CP16 PP16, seq 131072) costed.

The tables go into ``benchmarks/README_ulysses.md`` between its markers.

    .venv/bin/python benchmarks/ulysses_sweep.py
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megallama.errors import UserError  # noqa: E402
from megallama.profiling import published as pub  # noqa: E402
from megallama.profiling.arch import as_spec  # noqa: E402
from megallama.profiling.hardware import load_hardware  # noqa: E402
from megallama.profiling.planner import plan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README_ulysses.md"
SWEEP = (("llama3-8b", 8), ("llama3-70b", 64))
SEQS = (8192, 16384, 32768, 65536, 131072)
GiB = 2 ** 30


def _best(spec, gpus, hw, seq, **fixed):
    try:
        return plan(spec, gpus, hw, seq=seq, **fixed).best
    except UserError:   # nothing fits
        return None


def sweep():
    hw = load_hardware("h100-sxm")
    for name, gpus in SWEEP:
        spec = as_spec(name)
        for seq in SEQS:
            for label, fixed in (("searched", {}), ("ulysses=1", {"ulysses": 1})):
                p = _best(spec, gpus, hw, seq, **fixed)
                yield {"model": name, "gpus": gpus, "seq": seq, "search": label,
                       "layout": p.layout.describe() if p else "none fits",
                       "ulysses": p.layout.ulysses if p else "", "tp": p.layout.tp if p else "",
                       "tokens_per_s_per_gpu": round(p.tokens_per_s_per_gpu) if p else "",
                       "mfu": round(p.mfu, 3) if p else "",
                       "memory_gib": round(p.memory.total / GiB, 1) if p else "",
                       "activations_gib": round(p.memory.activations / GiB, 1) if p else ""}


def published():
    for r in pub.ULYSSES_FIGURES:
        p = pub.predict_long_row(r)
        pred = p.hardware_tflops_per_gpu if p else None
        err = (pred / r.tflops_per_gpu - 1) if (pred and r.tflops_per_gpu) else None
        yield {"model": r.model, "gpus": r.gpus, "system": r.system, "seq": r.seq,
               "published_tflops": r.tflops_per_gpu if r.tflops_per_gpu is not None else "OOM",
               "predicted_tflops": round(pred, 1) if pred else "OOM",
               "error": round(err, 3) if err is not None else "",
               "predicted_layout": p.layout.describe() if p else "none fits",
               "predicted_memory_gib": round(p.memory.total / GiB, 1) if p else ""}


def _write_csv(path: Path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, gpus) in zip(axes, SWEEP):
        for label, style in (("searched", "o-"), ("ulysses=1", "s--")):
            pts = [r for r in rows if r["model"] == name and r["search"] == label and r["tokens_per_s_per_gpu"] != ""]
            ax.plot([r["seq"] // 1024 for r in pts], [r["tokens_per_s_per_gpu"] for r in pts], style,
                    label="Ulysses searched" if label == "searched" else "TP/PP/DP only (ulysses=1)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name} on {gpus} x H100 (predicted)")
        ax.set_xlabel("sequence length (K tokens)")
        ax.set_ylabel("tokens/s per GPU")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(rows, cols) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _fill(text: str, marker: str, table: str) -> str:
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    sw = list(sweep())
    _write_csv(RESULTS / "ulysses_sweep.csv", sw)
    _plot(sw, RESULTS / "ulysses_sweep.png")
    pb = list(published())
    _write_csv(RESULTS / "ulysses_vs_published.csv", pb)
    p = pub.predict_llama3_cp()
    r = pub.LLAMA3_CP_ROW
    no_bubble = p.tflops_per_gpu * p.step_time_s / (p.step_time_s - p.time["pipeline_bubble"])
    cp = [{"run": "Llama 3 405B, 16,384 H100, seq 131072", "layout": p.layout.describe(),
           "published_tflops": r["tflops_per_gpu"], "predicted_tflops": round(p.tflops_per_gpu, 1),
           "error": round(p.tflops_per_gpu / r["tflops_per_gpu"] - 1, 3),
           "predicted_without_bubble": round(no_bubble, 1),
           "error_without_bubble": round(no_bubble / r["tflops_per_gpu"] - 1, 3),
           "memory_gib": round(p.memory.total / GiB, 1),
           "bubble_share": round(p.time["pipeline_bubble"] / p.step_time_s, 3)}]
    _write_csv(RESULTS / "llama3_cp.csv", cp)
    text = README.read_text()
    text = _fill(text, "sweep", _table(sw, ["model", "gpus", "seq", "search", "layout", "tokens_per_s_per_gpu", "mfu",
                                             "memory_gib", "activations_gib"]))
    text = _fill(text, "published", _table(pb, ["model", "gpus", "system", "seq", "published_tflops",
                                                 "predicted_tflops", "error", "predicted_layout"]))
    text = _fill(text, "cp", _table(cp, list(cp[0])))
    README.write_text(text)
    for row in pb:
        print(row)
    print(cp[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
