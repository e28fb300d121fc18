#!/usr/bin/env python
"""Layout matrix: every layout ``megallama validate`` accepts at up to 4 ranks (tp, pp, sequence
parallelism, ZeRO stage, activation checkpointing, gradient accumulation, fp32/bf16) trained 3
steps and compared with the single-process run of the same precision: the largest relative
|Δloss| and |Δgrad norm| over the steps, against tests/layout_design.py TOLERANCE.

Results are rewritten after every case, so a run stopped early still records how far it got; the
CI design (``--pairwise``) runs first and the rest in a fixed shuffle, so a partial run samples it all.

The full product takes hours on a small box: ``--resume`` keeps the rows an earlier run of the same
design recorded (each row names the commit it ran at) and runs only the rest.

usage: python benchmarks/layout_matrix.py [--pairwise] [--limit N] [--resume] [--out benchmarks/results/layout_matrix.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import layout_design as design  # noqa: E402

FIELDS = ["case", "world", "status", "rel_dloss", "rel_dgradnorm", "seconds", "commit", "error"] + list(design.Case._fields)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def recorded(out: Path, cases: List[design.Case]) -> List[dict]:
    """Rows of an earlier run of this design worth keeping: same steps and tolerance, a verdict, a commit."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if old.get("steps") != design.STEPS or old.get("tolerance") != design.TOLERANCE:
        return []
    names = {c.name for c in cases}
    return [r for r in old.get("cases", []) if r.get("commit") and r["case"] in names
            and r.get("status") in ("pass", "MISMATCH")]


def _eta(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run_matrix(cases: List[design.Case], work: Path, out: Optional[Path] = None,
               echo: Callable[[str], None] = print, kept: Optional[List[dict]] = None) -> List[dict]:
    """Run ``cases`` (references first) except those ``kept`` from an earlier run; one result row per
    case, written to ``out`` as it goes."""
    kept = list(kept or [])
    total = len(cases)
    done = {r["case"] for r in kept}
    cases = [c for c in cases if c.name not in done]
    commit = _commit()
    base = design.base_config(work, work / "data")
    refs = {}
    for name, extra in sorted(dict(design.reference(c) for c in cases).items()):
        refs[name] = design.run_case(base, extra, 1, work / f"ref_{name}")
        echo(f"reference {name}: losses {refs[name]['losses']} grad norms {refs[name]['grad_norms']}")
    rows: List[dict] = kept
    start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        row = {"case": case.name, "world": case.world, **case._asdict(), "commit": commit, "error": ""}
        try:
            got = design.run_case(base, design.overrides(case), case.world, work / case.name, timeout=900)
            ref = refs[design.reference(case)[0]]
            row.update(got)  # every step's loss and grad norm (json only)
            row["rel_dloss"] = design.rel_diff(got["losses"], ref["losses"])
            row["rel_dgradnorm"] = design.rel_diff(got["grad_norms"], ref["grad_norms"])
            tol = design.TOLERANCE[case.precision]
            row["status"] = "pass" if max(row["rel_dloss"], row["rel_dgradnorm"]) <= tol else "MISMATCH"
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            row.update(status="ERROR", rel_dloss=None, rel_dgradnorm=None, error=_reason(exc))
        shutil.rmtree(work / case.name, ignore_errors=True)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        elapsed = time.perf_counter() - start
        rate = i / elapsed * 60
        echo(f"[{len(rows)}/{total}] {case.name:<48} {row['status']:<8} dloss {_fmt(row['rel_dloss'])} "
             f"dgnorm {_fmt(row['rel_dgradnorm'])} | {rate:.2f} cases/min, ETA {_eta((len(cases) - i) * elapsed / i)}")
        if out is not None:
            write(rows, total, out, refs)
    return rows


def _reason(exc: Exception) -> str:
    """The one-line error a refused run printed, else the timeout, else the last lines."""
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"timed out after {exc.timeout:.0f} s"
    lines = str(exc).strip().splitlines()
    said = [line.strip() for line in lines if "megallama train: error:" in line]
    return (said[0] if said else " | ".join(lines[-3:]))[-400:]


def _fmt(x) -> str:
    return "   n/a  " if x is None else f"{x:.2e}"


def write(rows: List[dict], total: int, out: Path, refs: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"done": len(rows), "total": total, "complete": len(rows) == total, "references": refs,
               "steps": design.STEPS,
               "seq_len": design.SEQ_LEN, "global_batch": design.GLOBAL_BATCH, "tolerance": design.TOLERANCE,
               "failed": [r["case"] for r in rows if r["status"] != "pass"], "cases": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def table(rows: List[dict]) -> str:
    lines = [f"{'case':<48} {'ranks':>5} {'|dloss|/loss':>12} {'|dgnorm|/gnorm':>14}  status"]
    for r in rows:
        lines.append(f"{r['case']:<48} {r['world']:>5} {_fmt(r['rel_dloss']):>12} {_fmt(r['rel_dgradnorm']):>14}  "
                     f"{r['status']}{'  ' + r['error'] if r['error'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train every valid layout 3 steps; compare loss and grad norm "
                                             "with one process of the same precision.")
    ap.add_argument("--pairwise", action="store_true", help="only the CI design (all pairs of option values)")
    ap.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--resume", action="store_true", help="keep the verdicts an earlier run recorded in --out")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layout_matrix.json")
    args = ap.parse_args(argv)
    cases = list(design.ci_design())
    if not args.pairwise:  # the CI design first, then the rest in a fixed shuffle: a partial run samples it all
        rest = [c for c in design.valid_cases() if c not in cases]
        random.Random(0).shuffle(rest)
        cases += rest
    cases = cases[:args.limit]
    print(f"{len(cases)} cases ({'pairwise design' if args.pairwise else 'every valid combination'} of "
          f"{len(design.all_cases())}; {len(design.valid_cases())} valid)", flush=True)
    with tempfile.TemporaryDirectory(prefix="layout_matrix_") as tmp:
        kept = recorded(args.out, cases) if args.resume else []
        if kept:
            print(f"resuming: {len(kept)} cases already recorded in {args.out}", flush=True)
        rows = run_matrix(cases, Path(tmp), args.out, echo=lambda s: print(s, flush=True), kept=kept)
    print(table(rows))
    bad = [r["case"] for r in rows if r["status"] != "pass"]
    print(f"{len(rows) - len(bad)}/{len(rows)} within tolerance {design.TOLERANCE}; results in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
