#!/usr/bin/env python
"""Soak: many steps at 4 ranks with ZeRO-3, TP=2 and activation checkpointing on CPU. Reports
resident-memory growth after warm-up, open file descriptors and throughput drift from rank 0's
metrics, and fails (exit 1) past the targets: RSS growth < 3%, no fd growth, steady tokens/s.

usage: python benchmarks/soak.py [--steps 300] [--ranks 4] [--out benchmarks/results/soak.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(steps: int, ranks: int, run_dir: Path, log_every: int) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "-m", "megallama", "train",
           str(ROOT / "examples" / "tiny.yaml"), "--set", f"run_dir={run_dir}", "--set", f"train.steps={steps}",
           "--set", f"train.log_every={log_every}", "--set", "parallel.tp=2", "--set", "train.seq_len=64",
           "--set", "train.micro_batch_size=4", "--set", f"train.global_batch_size={4 * ranks // 2}",
           "--set", "deepspeed.zero_optimization.stage=3", "--set", "train.activation_checkpointing.mode=full",
           "--set", "checkpoint.every=0", "--set", "data.embedded_max_files=60",
           "--set", f"data.cache_dir={run_dir.parent / 'data'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def analyse(records: list, warmup_frac: float = 0.2) -> dict:
    start = max(1, int(len(records) * warmup_frac))
    after = records[start:]
    rss0, rss1 = after[0]["rss_bytes"], max(r["rss_bytes"] for r in after)
    fds = [r["open_fds"] for r in after]
    quarter = max(1, len(fds) // 4)
    fd_trend = statistics.median(fds[-quarter:]) - statistics.median(fds[:quarter])  # a leak grows; a blip does not
    half = len(after) // 2
    tps_a = statistics.median(r["tokens_per_s"] for r in after[:half])
    tps_b = statistics.median(r["tokens_per_s"] for r in after[half:])
    return {"records": len(records), "rss_after_warmup": rss0, "rss_max": rss1, "rss_growth": rss1 / rss0 - 1,
            "fds_first": fds[0], "fds_max": max(fds), "fd_growth": fd_trend, "fds": fds,
            "rss": [r["rss_bytes"] for r in after],
            "tokens_per_s_first_half": tps_a, "tokens_per_s_second_half": tps_b, "throughput_ratio": tps_b / tps_a}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = run(args.steps, args.ranks, Path(tmp) / "run", args.log_every)
    result = {"args": vars(args), **analyse(records)}
    ok = result["rss_growth"] < 0.03 and result["fd_growth"] <= 0 and result["throughput_ratio"] > 0.8
    result["pass"] = ok
    print(f"RSS after warm-up {result['rss_after_warmup'] / 2**20:.1f} MiB -> max {result['rss_max'] / 2**20:.1f} MiB "
          f"(growth {100 * result['rss_growth']:.2f}%, target < 3%); open fds {result['fds_first']} -> max "
          f"{result['fds_max']}; tokens/s first half {result['tokens_per_s_first_half']:,.0f}, second half "
          f"{result['tokens_per_s_second_half']:,.0f} (ratio {result['throughput_ratio']:.2f})  "
          f"{'PASS' if ok else 'FAIL'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
