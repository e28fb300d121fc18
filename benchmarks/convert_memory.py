#!/usr/bin/env python
"""Peak resident memory of ``megallama convert`` on a multi-GB checkpoint: streaming (each output
tensor read, written and dropped before the next) against loading the model whole.

A random Llama 3-style model (Llama 3.2 1B's shape, untied: 128,256-token vocabulary, GQA 8, RoPE
scaling; ~1.5 B parameters, ~3 GB in bf16) is written as a sharded bf16 Hugging Face checkpoint
through the same streaming writer, so it is never held in memory either. Each measurement is a
fresh process reporting its own peak resident set (``VmHWM``, file pages mapped by ``safe_open``
included; not ``ru_maxrss``, which Linux carries over from the forking parent across ``exec``),
next to that of a process that only imported what convert imports.

usage: python benchmarks/convert_memory.py [--layers 16] [--workdir /tmp]
Writes benchmarks/results/convert_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
sys.argv = ["megallama"] + sys.argv[1:]
import torch, safetensors, megallama.cli, megallama.checkpoint.hf, megallama.checkpoint.consolidated
t0 = time.perf_counter()
if sys.argv[1] == "--load-whole":  # the pre-streaming path: the whole model in memory, then written
    from megallama.checkpoint.hf import load_hf
    from megallama.checkpoint.consolidated import save_consolidated
    cfg, state = load_hf(sys.argv[2])
    save_consolidated(state, cfg, sys.argv[3])
elif sys.argv[1] != "--baseline":
    assert megallama.cli.main(sys.argv[1:]) == 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - t0}))
"""


def random_checkpoint(out: Path, layers: int) -> dict:
    """A bf16 sharded HF checkpoint of random weights, generated tensor by tensor."""
    import torch

    from megallama.checkpoint.consolidated import expected_shapes
    from megallama.checkpoint.hf import save_hf
    from megallama.checkpoint.streaming import Lazy
    from megallama.config import ModelConfig

    cfg = ModelConfig.preset("llama3.2-1b", n_layers=layers, tie_embeddings=False, max_seq_len=8192)

    def generator(name, shape):
        def read(start, stop):
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{start}".encode()))
            return torch.empty((stop - start,) + shape[1:]).normal_(0.0, 0.02, generator=g)
        return read

    state = {k: Lazy(v, torch.bfloat16, generator(k, v)) for k, v in expected_shapes(cfg, "benchmark").items()}
    save_hf(state, cfg, out, max_shard_bytes=2 * 10**9)
    largest = max(state.values(), key=lambda t: t.numel())
    return {"preset": "llama3.2-1b (untied)", "n_layers": layers,
            "parameters": sum(t.numel() for t in state.values()),
            "bytes_bf16": sum(t.numel() * 2 for t in state.values()), "largest_tensor": list(largest.shape),
            "largest_tensor_mb_bf16": largest.numel() * 2 / 2**20,
            "largest_tensor_mb_fp32": largest.numel() * 4 / 2**20}


def measure(*argv) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{argv}: failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where the multi-GB checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model = random_checkpoint(work / "hf", args.layers)
        model["generate_seconds"] = time.perf_counter() - t0
        runs = {"baseline (imports only)": measure("--baseline")}
        cases = [
            ("hf bf16 sharded -> megallama (streamed)",
             ["convert", "--from", "hf", "--input", work / "hf", "--output", work / "ours"]),
            ("hf bf16 -> megallama --dtype float32 (streamed)",
             ["convert", "--from", "hf", "--input", work / "hf", "--output", work / "ours32", "--dtype", "float32"]),
            ("megallama -> hf --shard-size 1GB (streamed)",
             ["convert", "--to", "hf", "--input", work / "ours", "--output", work / "back", "--shard-size", "1GB"]),
            ("hf bf16 -> megallama, model loaded whole (load_hf + save_consolidated)",
             ["--load-whole", work / "hf", work / "whole"]),
        ]
        for what, argv in cases:
            runs[what] = measure(*argv)
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
            for out in ("ours32", "whole"):
                shutil.rmtree(work / out, ignore_errors=True)
        result = {"model": model, "runs": runs, "host": socket.gethostname(), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "python": platform.python_version()}
        out = ROOT / "benchmarks" / "results" / "convert_memory.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
