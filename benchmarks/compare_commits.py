#!/usr/bin/env python
"""A benchmark at two commits, interleaved: did a change move speed or memory?

Runs ``benchmarks/peer_step.py`` (or ``--bench``) in a throw-away worktree of ``--base`` and in
this tree, in ABBA order per pair so that drift in the machine's load falls on both sides alike,
and reports new/base ratios of the step times and memory figures. Ratios within the spread the
base shows against itself are noise.

usage: python benchmarks/compare_commits.py --base REV [--pairs 2] [--out FILE] [-- peer_step args...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]

# (label, path into peer_step.py's JSON); lower is better for every one
FIGURES = [
    ("step_s", ("timing", "megallama", "median_s")),
    ("step_s_vs_hf", ("speedup_vs_hf", "megallama", "median_of_paired_rounds")),
    ("deepspeed_zero1_step_s", ("deepspeed", "timing", "deepspeed", "median_s")),
    ("deepspeed_zero0_step_s", ("deepspeed_zero0", "timing", "deepspeed", "median_s")),
    ("static_bytes", ("memory", "static_bytes", "megallama")),
    ("step_peak_bytes", ("memory", "step_peak_bytes", "megallama")),
    ("peak_rss_bytes", ("memory", "peak_rss_bytes", "megallama")),
]


def _dig(d: dict, path) -> float:
    for key in path:
        d = d[key]
    return float(d)


def figures(result: dict) -> Dict[str, float]:
    out = {}
    for label, path in FIGURES:
        try:
            value = _dig(result, path)
        except (KeyError, TypeError):
            continue
        out[label] = 1.0 / value if label == "step_s_vs_hf" else value  # speed-up over HF -> relative time
    return out


def run_once(tree: Path, bench: str, args: List[str], out: Path) -> Dict[str, float]:
    cmd = [sys.executable, str(tree / bench), *args, "--out", str(out)]
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return figures(json.loads(out.read_text()))


def _ratio(new: List[float], base: List[float]) -> float:
    return statistics.median(new) / statistics.median(base)


def _spread(values: List[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit to compare against (e.g. main~5)")
    ap.add_argument("--pairs", type=int, default=2, help="ABBA pairs (each runs the benchmark twice per side)")
    ap.add_argument("--bench", default="benchmarks/peer_step.py")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_commits.json")
    ap.add_argument("bench_args", nargs="*", help="passed to the benchmark (after --)")
    a = ap.parse_args(argv)
    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], check=True,
                              capture_output=True, text=True).stdout.strip()
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    runs: Dict[str, List[Dict[str, float]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="compare_commits_") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), base_rev],
                       check=True)
        try:
            order = [side for _ in range(a.pairs) for side in ("base", "new", "new", "base")]
            start = time.perf_counter()
            for i, side in enumerate(order, 1):
                tree = base_tree if side == "base" else ROOT
                runs[side].append(run_once(tree, a.bench, a.bench_args, Path(tmp) / f"{side}{i}.json"))
                elapsed = time.perf_counter() - start
                print(f"[{i}/{len(order)}] {side}: step {runs[side][-1].get('step_s', float('nan')):.3f} s | "
                      f"ETA {elapsed / i * (len(order) - i):.0f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    summary = {"base": base_rev, "new": head_rev, "bench": a.bench, "bench_args": a.bench_args,
               "pairs": a.pairs, "runs": runs, "ratio_new_over_base": {}, "base_spread": {}}
    print(f"{'figure':<24} {'base':>14} {'new':>14} {'new/base':>9} {'base spread':>12}")
    for label, _ in FIGURES:
        base = [r[label] for r in runs["base"] if label in r]
        new = [r[label] for r in runs["new"] if label in r]
        if not base or not new:
            continue
        summary["ratio_new_over_base"][label] = ratio = _ratio(new, base)
        summary["base_spread"][label] = spread = _spread(base)
        print(f"{label:<24} {statistics.median(base):>14.4g} {statistics.median(new):>14.4g} {ratio:>9.3f} "
              f"{spread:>12.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
