#!/usr/bin/env python
"""Planner predictions against published runs: Table 1 of Narayanan et al. 2021 (Megatron-LM on
Selene) and the MPT / torchtitan FSDP runs of :mod:`megallama.profiling.published_runs`.

Writes ``benchmarks/results/planner_vs_megatron.csv``, ``planner_vs_published.csv`` and its
scatter plot ``planner_vs_published.png``, and the tables in ``benchmarks/README_planner.md``
(between its ``<!-- table -->`` and ``<!-- runs -->`` markers).

    .venv/bin/python benchmarks/validate_planner.py [--recalibrate]

``--recalibrate`` re-runs the fit (:func:`megallama.profiling.calibration.calibrate`) and reports with what it
finds (the shipped defaults are what this fit found).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megallama.profiling.published import CALIBRATION_ROWS, summary, validate  # noqa: E402
from megallama.profiling.calibration import calibrate  # noqa: E402
from megallama.profiling.published_runs import EARLIER_A100_80, by_generation, remeasured, validate_runs  # noqa: E402
from megallama.profiling.steptime import Efficiency  # noqa: E402

CSV = ROOT / "benchmarks" / "results" / "planner_vs_megatron.csv"
RUNS_CSV = ROOT / "benchmarks" / "results" / "planner_vs_published.csv"
PNG = ROOT / "benchmarks" / "results" / "planner_vs_published.png"
README = ROOT / "benchmarks" / "README_planner.md"
BEGIN, END = "<!-- table -->", "<!-- /table -->"
RUNS_BEGIN, RUNS_END = "<!-- runs -->", "<!-- /runs -->"
REMEASURED_BEGIN, REMEASURED_END = "<!-- remeasured -->", "<!-- /remeasured -->"
REMEASURED_SHOWN = 0.08  # configurations whose two measurements differ by more than this are listed


def rows(eff: Efficiency):
    for r in validate(eff):
        p, lay = r.prediction, r.prediction.layout
        yield {"params_b": r.row.params_b, "heads": r.row.heads, "hidden": r.row.hidden, "layers": r.row.layers,
               "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "gpus": r.row.gpus, "batch": r.row.batch,
               "mbs": lay.mbs, "microbatches": lay.grad_accum, "published_tflops": r.row.tflops_per_gpu,
               "predicted_tflops": round(r.predicted, 1), "error": round(r.error, 4),
               "predicted_memory_gib": round(p.memory.total / 2 ** 30, 1),
               "bubble_s": round(p.time["pipeline_bubble"], 2), "step_time_s": round(p.step_time_s, 2),
               "role": "calibration" if r.calibration else "held-out"}, r


def markdown(table, eff: Efficiency) -> str:
    s = summary([r for _, r in table])
    head = ("| params (B) | heads | hidden | layers | TP | PP | DP | GPUs | batch | mbs (chosen) | published "
            "TFLOP/s/GPU | predicted | error | role |")
    lines = [head, "|" + "---|" * 14]
    for d, _ in table:
        lines.append(f"| {d['params_b']} | {d['heads']} | {d['hidden']} | {d['layers']} | {d['tp']} | {d['pp']} | "
                     f"{d['dp']} | {d['gpus']} | {d['batch']} | {d['mbs']} | {d['published_tflops']:g} | "
                     f"{d['predicted_tflops']} | {d['error']:+.1%} | {d['role']} |")
    lines += ["", f"Constants: `Efficiency(gemm={eff.gemm}, traffic_fused={eff.traffic_fused})` (the ones "
              f"these rows use), fitted with the {', '.join(f'{b:g}B' for b in CALIBRATION_ROWS)} rows in the fit set.",
              f"All rows: median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}. "
              f"Held-out rows only: median {s['median_abs_error_held_out']:.1%}, "
              f"max {s['max_abs_error_held_out']:.1%}."]
    return "\n".join(lines)


def llama_65b_check() -> str:
    """Out of sample, not a target: LLaMA-65B, ~380 tokens/s/GPU on 2048 A100-80GB (Touvron et al.
    2023, sec. 2.4; their exact layout is not published), against the planner's best layout."""
    from megallama.profiling.arch import as_spec
    from megallama.profiling.hardware import load_hardware
    from megallama.profiling.planner import plan

    best = plan(as_spec("llama-65b"), 2048, load_hardware("a100-80gb"), seq=2048).best
    err = best.tokens_per_s_per_gpu / 380 - 1
    return (f"Out of sample: LLaMA-65B on 2048 x A100-80GB, published ~380 tokens/s/GPU; the planner's best "
            f"layout ({best.layout.describe()}) predicts {best.tokens_per_s_per_gpu:.0f} ({err:+.0%}), "
            f"MFU {best.mfu:.1%}.")


def run_rows(eff: Efficiency):
    for r in validate_runs(eff):
        p, run = r.prediction, r.run
        yield {"source": run.source, "gpu": run.gpu, "generation": run.generation, "model": run.model,
               "seq": run.seq, "gpus": run.gpus, "tp": run.tp, "pp": run.pp, "interleave": run.interleave,
               "zero": run.zero, "mbs": run.mbs, "accum": run.accum,
               "recompute": run.recompute, "published_tokens_per_s_per_gpu": run.tokens_per_s_per_gpu,
               "predicted_tokens_per_s_per_gpu": round(p.tokens_per_s_per_gpu, 1), "error": round(r.error, 4),
               "predicted_mfu": round(p.mfu, 4), "predicted_memory_gib": round(p.memory.total / 2 ** 30, 1),
               "role": "calibration" if r.calibration else "held-out"}, r


def runs_markdown(table, megatron, eff: Efficiency) -> str:
    gens = by_generation([r for _, r in table], megatron)
    lines = ["| generation | fit rows | fit median abs error | fit max | held-out rows | held-out median abs error "
             "| held-out max |", "|" + "---|" * 7]
    for g, v in gens.items():
        lines.append(f"| {g.upper()} | {v['fit_rows']} | {v['fit_median']:.1%} | {v['fit_max']:.1%} | "
                     f"{v['held_out_rows']} | {v['held_out_median']:.1%} | {v['held_out_max']:.1%} |")
    lines += ["", "By source and GPU (held-out rows only):", "",
              "| source | GPU | rows | median abs error | median error (signed) | max abs error |", "|" + "---|" * 6]
    import statistics
    groups = {}
    for d, r in table:
        if not r.calibration:
            groups.setdefault((d["source"], d["gpu"]), []).append(r.error)
    for (src, gpu), errs in sorted(groups.items()):
        lines.append(f"| {src} | {gpu} | {len(errs)} | {statistics.median(abs(e) for e in errs):.1%} | "
                     f"{statistics.median(errs):+.1%} | {max(abs(e) for e in errs):.1%} |")
    worst = sorted((t for t in table if not t[1].calibration), key=lambda t: -abs(t[1].error))[:8]
    lines += ["", "Largest held-out errors:", "", "| run | published tokens/s/GPU | predicted | error |",
              "|---|---|---|---|"]
    lines += [f"| {r.run.name} | {d['published_tokens_per_s_per_gpu']:g} | {d['predicted_tokens_per_s_per_gpu']:.0f} "
              f"| {r.error:+.1%} |" for d, r in worst]
    att = ", ".join(f"{k}: {v}" for k, v in eff.attention)
    clock = ", ".join(f"{k}: {v}" for k, v in eff.clock)
    contention = ", ".join(f"{k}: {v}" for k, v in eff.contention)
    lines += ["", f"Constants: `gemm={eff.gemm}` (large-GEMM ceiling), sustained clock {{{clock}}}, "
              f"`traffic={eff.traffic}` (eager PyTorch), `traffic_fused={eff.traffic_fused}` (Megatron), "
              f"flash attention fraction of peak {{{att}}}, compute lost per second of hidden ZeRO-3 exchange "
              f"{{{contention}}}; the NICs at their nominal bus bandwidth."]
    return "\n".join(lines)


def remeasured_markdown(table) -> str:
    """The source against itself: MPT's A100 80GB configurations measured in both table versions."""
    import statistics
    pairs = remeasured([r for _, r in table])
    moved = [abs(a.run.tokens_per_s_per_gpu / b.run.tokens_per_s_per_gpu - 1) for a, b in pairs]
    lines = [f"{len(pairs)} configurations measured in both versions: the later measurement differs from the "
             f"earlier by a median {statistics.median(moved):.1%}, at most {max(moved):.1%}; "
             f"{sum(m > 0.10 for m in moved)} by more than 10%. Those differing by more than "
             f"{REMEASURED_SHOWN:.0%}:", "",
             "| configuration | earlier (bf16 PURE) | later (amp_bf16 DEFAULT) | later / earlier | predicted "
             "(earlier's precision, later's) | error vs earlier | error vs later |", "|" + "---|" * 7]
    for (a, b), m in sorted(zip(pairs, moved), key=lambda t: -t[1]):
        if m <= REMEASURED_SHOWN:
            continue
        lines.append(f"| {a.run.name} | {b.run.tokens_per_s_per_gpu:g} | {a.run.tokens_per_s_per_gpu:g} | "
                     f"{a.run.tokens_per_s_per_gpu / b.run.tokens_per_s_per_gpu:.3f} | "
                     f"{b.prediction.tokens_per_s_per_gpu:.0f}, {a.prediction.tokens_per_s_per_gpu:.0f} | "
                     f"{b.error:+.1%} | {a.error:+.1%} |")
    return "\n".join(lines)


def scatter(table, megatron) -> None:
    """Predicted against published, per GPU generation, on log axes (Megatron on TFLOP/s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, gen in zip(axes, ("a100", "h100")):
        pts = [(r.run.tokens_per_s_per_gpu, r.prediction.tokens_per_s_per_gpu, r.calibration, r.run.source)
               for _, r in table if r.generation == gen]
        for src, marker in (("mpt", "o"), (EARLIER_A100_80, "^"), ("torchtitan", "s")):
            for fit, colour in ((False, "tab:blue"), (True, "tab:red")):
                xs = [p for p, _, c, s_ in pts if c == fit and s_ == src]
                ys = [q for _, q, c, s_ in pts if c == fit and s_ == src]
                if xs:
                    ax.scatter(xs, ys, s=14, marker=marker, c=colour,
                               label=f"{src} {'fit' if fit else 'held out'}")
        lo = min(min(p, q) for p, q, _, _ in pts) / 1.5
        hi = max(max(p, q) for p, q, _, _ in pts) * 1.5
        for k, style in ((1.0, "k-"), (1.1, "k:"), (1 / 1.1, "k:"), (1.25, "k--"), (1 / 1.25, "k--")):
            ax.plot([lo, hi], [lo * k, hi * k], style, lw=0.7)
        ax.set(xscale="log", yscale="log", xlabel="published tokens/s/GPU", ylabel="predicted tokens/s/GPU",
               title=f"{gen.upper()}: dotted +-10%, dashed +-25%")
        ax.legend(fontsize=7)
    if megatron:
        ins = axes[0].inset_axes([0.62, 0.08, 0.35, 0.3])
        ins.scatter([m.row.tflops_per_gpu for m in megatron], [m.predicted for m in megatron], s=8, c="tab:green")
        ins.plot([120, 180], [120, 180], "k-", lw=0.5)
        ins.set_title("Megatron TFLOP/s", fontsize=7)
        ins.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    plt.close(fig)


def write_csv(path: Path, table) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0][0]))
        w.writeheader()
        w.writerows(d for d, _ in table)


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    before, rest = text.split(begin, 1)
    return f"{before}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recalibrate", action="store_true")
    args = ap.parse_args()
    eff = calibrate() if args.recalibrate else Efficiency()
    table = list(rows(eff))
    runs = list(run_rows(eff))
    CSV.parent.mkdir(parents=True, exist_ok=True)
    write_csv(CSV, table)
    write_csv(RUNS_CSV, runs)
    scatter(runs, [r for _, r in table])
    md = markdown(table, eff) + "\n\n" + llama_65b_check()
    runs_md = runs_markdown(runs, [r for _, r in table], eff)
    text = README.read_text() if README.exists() else ""
    again_md = remeasured_markdown(runs)
    text = replace_block(replace_block(text, BEGIN, END, md), RUNS_BEGIN, RUNS_END, runs_md)
    text = replace_block(text, REMEASURED_BEGIN, REMEASURED_END, again_md)
    README.write_text(text)
    print(md + "\n\n" + runs_md + "\n\n" + again_md)
    print(f"\nwrote {CSV.relative_to(ROOT)}, {RUNS_CSV.relative_to(ROOT)}, {PNG.relative_to(ROOT)} and "
          f"{README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
