#!/usr/bin/env python
"""Peak resident memory and time of ``megallama convert --to dcp`` / ``--from dcp`` on multi-GB
checkpoints (issue 19 part 5): both directions stream tensor by tensor, so the peak should sit near
the largest tensor (plus DCP's own read copy of it), not the checkpoint.

Two cases, each a fresh process per conversion reporting its own ``VmHWM`` (as
``benchmarks/convert_memory.py`` measures), next to a process that only imported the modules:
- weights: Llama 3.2 1B's shape (untied, 128,256 vocabulary) with ``--layers`` blocks in bf16,
  generated tensor by tensor as a consolidated checkpoint -> DCP -> consolidated;
- training: the same shape with a 32,000-token vocabulary and ``--train-layers`` blocks, fp32
  weights and both Adam moments (12 bytes a parameter) as torchtitan saves them -> a megallama
  training checkpoint -> DCP.

usage: python benchmarks/convert_memory_dcp.py [--layers 8] [--train-layers 2] [--workdir /tmp]
Writes benchmarks/results/convert_memory_dcp.json.
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
import torch, torch.distributed.checkpoint, megallama.cli, megallama.checkpoint.dcp_convert
t0 = time.perf_counter()
if sys.argv[1] != "--baseline":
    assert megallama.cli.main(sys.argv[1:]) == 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - t0}))
"""


def _generator(name, shape):
    import torch

    def read(start, stop):
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{start}".encode()))
        return torch.empty((stop - start,) + tuple(shape[1:])).normal_(0.0, 0.02, generator=g).abs_()
    return read


def _random(cfg, dtype):
    from megallama.checkpoint.consolidated import expected_shapes
    from megallama.checkpoint.streaming import Lazy

    return {k: Lazy(v, dtype, _generator(k, v)) for k, v in expected_shapes(cfg, "benchmark").items()}


def _describe(state, what: str) -> dict:
    largest = max(state.values(), key=lambda t: t.numel())
    return {"what": what, "parameters": sum(t.numel() for t in state.values()),
            "largest_tensor": list(largest.shape),
            "largest_tensor_mb": largest.numel() * largest.element_size() / 2**20}


def weights_checkpoint(out: Path, layers: int) -> dict:
    import torch

    from megallama.checkpoint.consolidated import save_consolidated
    from megallama.config import ModelConfig

    cfg = ModelConfig.preset("llama3.2-1b", n_layers=layers, tie_embeddings=False, max_seq_len=8192)
    state = _random(cfg, torch.bfloat16)
    save_consolidated(state, cfg, out)
    return {**_describe(state, f"llama3.2-1b shape, {layers} layers, bf16 weights"),
            "bytes": sum(t.numel() * 2 for t in state.values())}


def training_dcp(out: Path, layers: int) -> dict:
    """A torchtitan-named DCP with fp32 weights, both Adam moments and a step, written streamed."""
    import torch

    from megallama.checkpoint.dcp import MOMENTS, OPT, save_titan, to_titan
    from megallama.checkpoint.dcp_convert import optimizer_values
    from megallama.config import ModelConfig

    cfg = ModelConfig.preset("llama3.2-1b", n_layers=layers, vocab_size=32000, tie_embeddings=False,
                             max_seq_len=8192)
    weights = _random(cfg, torch.float32)
    tensors = to_titan(weights, cfg)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for m in MOMENTS:
        tensors.update({OPT + k: v for k, v in to_titan(_random(cfg, torch.float32), cfg, "." + m).items()})
    tensors.update({f"{OPT}{n}.step": torch.tensor(100.0) for n in shapes})
    save_titan(out, tensors, optimizer_values(shapes, 100, 0, None), cfg)
    return {**_describe(weights, f"llama3.2-1b shape, vocab 32000, {layers} layers, fp32 weights + Adam moments"),
            "bytes": sum(t.numel() * 12 for t in weights.values())}


def measure(*argv) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{argv}: failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the multi-GB checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_dcp.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        models = {"weights": weights_checkpoint(work / "ours", args.layers)}
        models["weights"]["generate_seconds"] = time.perf_counter() - t0
        runs = {"baseline (imports only)": measure("--baseline")}
        cases = [
            ("weights: megallama consolidated bf16 -> dcp", work / "titan",
             ["convert", "--to", "dcp", "--input", work / "ours", "--output", work / "titan"]),
            ("weights: dcp bf16 -> megallama consolidated", work / "back",
             ["convert", "--from", "dcp", "--input", work / "titan", "--output", work / "back"]),
        ]
        for what, out, argv in cases:
            runs[what] = {**measure(*argv), "output_bytes": _du(out)}
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
        for d in ("ours", "titan", "back"):
            shutil.rmtree(work / d, ignore_errors=True)
        t0 = time.perf_counter()
        models["training"] = training_dcp(work / "titan_train", args.train_layers)
        models["training"]["generate_seconds"] = time.perf_counter() - t0
        cases = [
            ("training: dcp fp32 + Adam -> megallama training checkpoint", work / "train",
             ["convert", "--from", "dcp", "--input", work / "titan_train", "--output", work / "train"]),
            ("training: megallama training checkpoint -> dcp fp32 + Adam", work / "titan_back",
             ["convert", "--to", "dcp", "--input", work / "train", "--output", work / "titan_back"]),
        ]
        for what, out, argv in cases:
            runs[what] = {**measure(*argv), "output_bytes": _du(out)}
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
        result = {"models": models, "runs": runs, "host": socket.gethostname(), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "python": platform.python_version(),
                  "command": "python benchmarks/convert_memory_dcp.py " + " ".join(sys.argv[1:])}
        out = ROOT / "benchmarks" / "results" / "convert_memory_dcp.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
