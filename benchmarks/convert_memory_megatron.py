#!/usr/bin/env python
"""Peak resident memory and time of ``megallama convert`` to and from Megatron's legacy checkpoints
on a multi-GB model, next to a process that only imported what convert imports and one that
loads a Megatron rank file whole (what a reader that is not streamed holds).

A random Llama 3.2 1B-shaped model (untied, 128,256-token vocabulary, GQA 8; ~1.5 B parameters,
~3 GB in bf16 at 16 layers) is written as a consolidated bf16 checkpoint tensor by tensor. Each
conversion is a fresh process reporting its own peak resident set (``VmHWM``, mapped file pages
included). Reading streams row blocks out of memory-mapped rank files; writing reserves each
tensor's space in the pickle (``skip_data``) and fills it through a shared mapping, one tensor at
a time, so both directions hold about one tensor, not the model.

usage: python benchmarks/convert_memory_megatron.py [--layers 16] [--workdir /tmp]
Writes benchmarks/results/convert_memory_megatron.json.
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
import torch, megallama.cli, megallama.checkpoint.megatron_files, megallama.checkpoint.consolidated
t0 = time.perf_counter()
if sys.argv[1] == "--load-whole":  # a rank file read into memory, as torch.load without mmap does
    from megallama.checkpoint.megatron_files import allowed_globals
    with torch.serialization.safe_globals(allowed_globals()):
        data = torch.load(sys.argv[2], weights_only=True)
elif sys.argv[1] != "--baseline":
    assert megallama.cli.main(sys.argv[1:]) == 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - t0}))
"""


def random_checkpoint(out: Path, layers: int) -> dict:
    """A bf16 consolidated checkpoint of random weights, generated and written tensor by tensor."""
    import torch

    from megallama.checkpoint.consolidated import expected_shapes, save_consolidated
    from megallama.checkpoint.streaming import Lazy
    from megallama.config import ModelConfig

    cfg = ModelConfig.preset("llama3.2-1b", n_layers=layers, tie_embeddings=False, max_seq_len=8192)

    def generator(name, shape):
        def read(start, stop):
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{start}".encode()))
            return torch.empty((stop - start,) + shape[1:]).normal_(0.0, 0.02, generator=g)
        return read

    state = {k: Lazy(v, torch.bfloat16, generator(k, v)) for k, v in expected_shapes(cfg, "benchmark").items()}
    save_consolidated(state, cfg, out)
    largest = max(state.values(), key=lambda t: t.numel())
    return {"preset": "llama3.2-1b (untied)", "n_layers": layers,
            "parameters": sum(t.numel() for t in state.values()),
            "bytes_bf16": sum(t.numel() * 2 for t in state.values()), "largest_tensor": list(largest.shape),
            "largest_tensor_mb_bf16": largest.numel() * 2 / 2**20}


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
    work = Path(tempfile.mkdtemp(prefix="convert_memory_megatron.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model = random_checkpoint(work / "ours", args.layers)
        model["generate_seconds"] = time.perf_counter() - t0
        runs = {"baseline (imports only)": measure("--baseline")}
        cases = [
            ("megallama bf16 -> megatron tp=1 pp=1 (streamed write)",
             ["convert", "--to", "megatron", "--input", work / "ours", "--output", work / "meg11"]),
            ("megallama bf16 -> megatron tp=2 pp=2 (streamed write)",
             ["convert", "--to", "megatron", "--tp", "2", "--pp", "2", "--input", work / "ours",
              "--output", work / "meg22"]),
            ("megatron tp=1 pp=1 -> megallama (streamed read)",
             ["convert", "--from", "megatron", "--input", work / "meg11", "--output", work / "back11"]),
            ("megatron tp=2 pp=2 -> megallama (streamed read)",
             ["convert", "--from", "megatron", "--input", work / "meg22", "--output", work / "back22"]),
            ("megatron tp=1 pp=1 rank file loaded whole (torch.load, no mmap)",
             ["--load-whole", work / "meg11" / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"]),
        ]
        for what, argv in cases:
            runs[what] = measure(*argv)
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
        same = all(_same(work / "ours", work / b) for b in ("back11", "back22"))
        result = {"model": model, "runs": runs, "round_trip_bitwise_equal": same, "host": socket.gethostname(),
                  "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                  "command": "python benchmarks/convert_memory_megatron.py " + " ".join(sys.argv[1:])}
        out = ROOT / "benchmarks" / "results" / "convert_memory_megatron.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _same(a: Path, b: Path) -> bool:
    """The weights came back bit for bit (compared a block of rows at a time)."""
    from megallama.checkpoint.consolidated import open_consolidated
    from megallama.checkpoint.streaming import equal

    (_, x), (_, y) = open_consolidated(a), open_consolidated(b)
    return set(x) == set(y) and all(equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    main()
