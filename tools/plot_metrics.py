#!/usr/bin/env python
"""Plot a run's ``metrics.jsonl`` (loss, LR, tokens/s, memory against step) to ``metrics.png``.

usage: python tools/plot_metrics.py RUN_DIR [--out FILE.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path):
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"plot_metrics: {path}:{i}: not a JSON line")
    return rows


def timeline(rows, key: str):
    """The records carrying ``key`` as one run forward in step: a record whose step does not move
    past the previous one starts a replay (a resume from an older checkpoint, in files written
    before resumes truncated them), and replaces what it replays, so a line never doubles back."""
    out = []
    for r in rows:
        if key not in r or not isinstance(r.get("step"), int):
            continue
        while out and out[-1]["step"] >= r["step"]:
            out.pop()
        out.append(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.is_file():
        sys.stderr.write(f"plot_metrics: {path}: not found (has the run logged a step?)\n")
        return 2
    rows = load(path)
    if not rows:
        sys.stderr.write(f"plot_metrics: {path}: no records\n")
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = timeline(rows, "loss"), timeline(rows, "eval_loss")
    steps = [r["step"] for r in train]
    panels = [("loss", "loss", 1), ("lr", "learning rate", 1), ("tokens_per_s", "tokens/s", 1),
              ("mem_bytes", "peak memory (GiB)", 2**-30)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label, scale) in zip(axes.flat, panels):
        ax.plot(steps, [(r.get(key) if r.get(key) is not None else float("nan")) * scale for r in train],
                marker=".", label="train")
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="eval")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"megallama run: {args.run_dir}")
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
