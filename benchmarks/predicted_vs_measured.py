"""Predicted vs measured step time of tiny CPU runs, layout by layout, from the runs' own reports.

Each layout is a real ``megallama train`` (torchrun, the tests' tiny config, 10 steps); the
figures are what ``report.json`` holds: the prediction the run printed at start and the median
logged step past the first. Appends one JSON line per layout to ``--out`` and prints a table.

    python benchmarks/predicted_vs_measured.py --out benchmarks/results/predicted_vs_measured.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dist_utils import free_port  # noqa: E402
from tests.train_utils import env, tiny_run_config  # noqa: E402

LAYOUTS = {
    "dp2": (2, []),
    "dp2 zero2 seq32": (2, ["train.seq_len=32", f"deepspeed={ROOT / 'ds_configs' / 'zero2.json'}"]),
    "dp2 recompute full": (2, ["train.activation_checkpointing.mode=full"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2+sp selective": (2, ["parallel.tp=2", "parallel.sequence_parallel=true",
                             "train.activation_checkpointing.mode=selective"]),
    "pp2": (2, ["parallel.pp=2", "train.micro_batch_size=2"]),
    "1 rank x2 accumulation": (1, []),
}


def run(name: str, tmp: Path, data: Path) -> dict:
    world, sets = LAYOUTS[name]
    tmp.mkdir(parents=True)
    cfg = tiny_run_config(tmp, data, steps=10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), "-m", "megallama", "train", str(cfg), "--set", f"run_dir={tmp / 'run'}"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, check=True)
    rep = json.loads((tmp / "run" / "report.json").read_text())
    return {"layout": name, "describe": rep["predicted"]["describe"], "measured_s": rep["step_time_s"],
            "predicted_s": rep["step_time_predicted_s"], "error": rep["step_time_error"],
            "load_avg_1min": os.getloadavg()[0], "hardware": rep["predicted"]["hardware_source"],
            "time_breakdown_s": rep["predicted"]["time_breakdown_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON lines appended here")
    ap.add_argument("layouts", nargs="*", default=list(LAYOUTS), help="a subset of: " + ", ".join(LAYOUTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print("| layout | predicted s | measured s | error | load |\n|---|---|---|---|---|")
        for name in args.layouts:
            row = run(name, Path(d) / name.replace(" ", "_"), Path(d) / "data")
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {name} | {row['predicted_s']:.3f} | {row['measured_s']:.3f} | {row['error']:+.0%} | "
                  f"{row['load_avg_1min']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
