#!/usr/bin/env python
"""Peak resident memory and time of ``megallama convert`` to and from megatron-core's ``torch_dist``
checkpoints on a multi-GB model, next to a process that only imported what convert imports.

The model and the measuring child are those of ``convert_memory_megatron.py`` (a random Llama 3.2
1B-shaped bf16 model, ~3 GB at 16 layers; ``VmHWM`` of a fresh process, mapped file pages
included). Writing produces each DCP chunk (one layer of a stacked tensor) only when DCP writes it;
reading assembles each row block of a layer from the chunks it overlaps, so both directions hold
about one tensor, not the model.

usage: python benchmarks/convert_memory_megatron_dist.py [--layers 16] [--workdir /tmp]
Writes benchmarks/results/convert_memory_megatron_dist.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_memory_megatron import _same, measure, random_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where the multi-GB checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_megatron_dist.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model = random_checkpoint(work / "ours", args.layers)
        model["generate_seconds"] = time.perf_counter() - t0
        runs = {"baseline (imports only)": measure("--baseline")}
        cases = [
            ("megallama bf16 -> megatron torch_dist (streamed write)",
             ["convert", "--to", "megatron", "--format", "torch_dist", "--input", work / "ours",
              "--output", work / "td"]),
            ("megatron torch_dist -> megallama (streamed read)",
             ["convert", "--from", "megatron", "--input", work / "td", "--output", work / "back"]),
        ]
        for what, argv in cases:
            runs[what] = measure(*argv)
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
        result = {"model": model, "runs": runs, "round_trip_bitwise_equal": _same(work / "ours", work / "back"),
                  "host": socket.gethostname(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                  "python": platform.python_version(),
                  "command": "python benchmarks/convert_memory_megatron_dist.py " + " ".join(sys.argv[1:])}
        out = ROOT / "benchmarks" / "results" / "convert_memory_megatron_dist.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
