#!/usr/bin/env python
"""How per-token time grows with sequence length in MPT's published 8-GPU rows, against the planner.

Why: the planner's worst A100 row (MPT 30B at 8,192 tokens) is a question of whether the
published slowdown is attention's work or something the planner does not model. Doubling the
sequence adds attention work per token in proportion, so the published increase in per-token
time between two lengths of one model on one GPU table should match the planner's increase
(its attention cost is the same for every model). A ratio near 1 says the growth is attention's;
one far above 1 says the run lost time to something else.

    .venv/bin/python benchmarks/published_seq_scaling.py

Writes ``benchmarks/results/published_seq_scaling.csv`` and ``.png`` and the table between
``<!-- seq-scaling -->`` markers in ``benchmarks/README_planner.md``.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megallama.profiling.published_runs import EARLIER_A100_80, PUBLISHED_RUNS, predict_published  # noqa: E402

CSV = ROOT / "benchmarks" / "results" / "published_seq_scaling.csv"
PNG = ROOT / "benchmarks" / "results" / "published_seq_scaling.png"
README = ROOT / "benchmarks" / "README_planner.md"
BEGIN, END = "<!-- seq-scaling -->", "<!-- /seq-scaling -->"
MODELS = ("7b", "13b", "30b")

# The same 30B rows measured earlier (the A100 80GB table's earlier version, source
# "mpt-2023-07": bf16 PURE, micro-batch 1, 21 accumulation steps): a second measurement of the outlier.
EARLIER_30B_A100 = sorted((r for r in PUBLISHED_RUNS if r.source == EARLIER_A100_80 and r.model == "30b"
                           and r.gpus == 8 and r.seq in (4096, 8192)), key=lambda r: r.seq)


def series():
    """(label, runs sorted by sequence): each model's 8-GPU rows with every block recomputed."""
    out = []
    for gpu in ("a100-40gb", "a100-80gb", "h100-sxm"):
        for model in MODELS:
            runs = sorted((r for r in PUBLISHED_RUNS if r.source == "mpt" and r.gpu == gpu and r.model == model
                           and r.gpus == 8 and r.recompute == "full"), key=lambda r: r.seq)
            if len(runs) >= 2:
                out.append((f"{gpu} {model}", runs))
    out.append(("a100-80gb 30b (earlier table)", EARLIER_30B_A100))
    return out


def rows():
    for label, runs in series():
        ms = [(r, 1e3 / r.tokens_per_s_per_gpu, 1e3 / predict_published(r).tokens_per_s_per_gpu) for r in runs]
        for (a, pa, qa), (b, pb, qb) in zip(ms, ms[1:]):
            yield {"series": label, "from_seq": a.seq, "to_seq": b.seq, "from_mbs": a.mbs, "to_mbs": b.mbs,
                   "published_ms_per_token": round(pb, 4), "published_increase_ms": round(pb - pa, 4),
                   "predicted_increase_ms": round(qb - qa, 4), "ratio": round((pb - pa) / (qb - qa), 2)}


def markdown(table) -> str:
    lines = ["| GPU, model | sequence | micro-batch | published ms/token | published increase | "
             "predicted increase | ratio |", "|" + "---|" * 7]
    for d in table:
        lines.append(f"| {d['series']} | {d['from_seq']} -> {d['to_seq']} | {d['from_mbs']} -> {d['to_mbs']} | "
                     f"{d['published_ms_per_token']} | {d['published_increase_ms']:+.4f} | "
                     f"{d['predicted_increase_ms']:+.4f} | {d['ratio']:.2f} |")
    return "\n".join(lines)


def plot(table) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(d["series"] for d in table):
        pts = [d for d in table if d["series"] == label]
        ax.plot([f"{d['from_seq'] // 1024}K-{d['to_seq'] // 1024}K" for d in pts], [d["ratio"] for d in pts],
                "o-" if "30b" in label else ".:", label=label)
    ax.axhline(1.0, color="k", lw=0.7)
    ax.set(ylabel="published / predicted increase in ms per token", xlabel="sequence doubling",
           title="MPT 8-GPU rows: per-token time growth with sequence")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    plt.close(fig)


def main() -> int:
    from benchmarks.validate_planner import replace_block
    table = list(rows())
    CSV.parent.mkdir(parents=True, exist_ok=True)
    with CSV.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    plot(table)
    md = markdown(table)
    README.write_text(replace_block(README.read_text(), BEGIN, END, md))
    print(md)
    print(f"\nwrote {CSV.relative_to(ROOT)}, {PNG.relative_to(ROOT)} and {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
