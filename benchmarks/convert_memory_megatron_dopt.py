#!/usr/bin/env python
"""Peak resident memory and time of ``megallama convert`` to and from Megatron's distributed-optimizer
form (``distrib_optim.pt`` beside each ``model_optim_rng.pt``), with the Adam state.

A random training checkpoint (fp32 masters and both moments) of a LLaMA of 0.2 B parameters (dim
1536, 4 layers, 32k vocabulary; 2.4 GB of Adam state) is converted to Megatron at tp=2 pp=2 with
``--distributed-optimizer`` and back, each conversion a fresh process reporting its own peak
resident set (``VmHWM``); the round trip is checked bit for bit. Writing Megatron reads each
training-checkpoint tensor when its block is written (a few whole tensors held: the largest,
per key) and fills the rank files through shared mappings; reading ``distrib_optim.pt`` goes
through remapped files, but the training checkpoint it becomes is assembled whole in memory
(``reshard.from_state``), so that direction's peak follows the Adam state's size.

usage: python benchmarks/convert_memory_megatron_dopt.py [--layers 4] [--workdir /tmp]
Writes benchmarks/results/convert_memory_megatron_dopt.json.
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

from benchmarks.convert_memory_megatron import measure  # noqa: E402


def random_training_checkpoint(out: Path, layers: int) -> dict:
    import torch

    from megallama.checkpoint.consolidated import expected_shapes
    from megallama.checkpoint.reshard import from_state
    from megallama.config import ModelConfig

    cfg = ModelConfig(dim=1536, n_layers=layers, n_heads=12, n_kv_heads=4, vocab_size=32000, multiple_of=256,
                      max_seq_len=4096, tie_embeddings=False)
    g = torch.Generator().manual_seed(0)
    masters = {k: torch.empty(v).normal_(0.0, 0.02, generator=g) for k, v in expected_shapes(cfg, "bench").items()}
    moments = {"exp_avg": {k: 3 * v for k, v in masters.items()}, "exp_avg_sq": {k: v * v for k, v in masters.items()}}
    from_state(cfg, masters, out, 1, 1, moments=moments, step=100, consumed_samples=1000)
    n = sum(t.numel() for t in masters.values())
    return {"dim": cfg.dim, "n_layers": layers, "vocab_size": cfg.vocab_size, "parameters": n,
            "adam_state_bytes": 12 * n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_megatron_dopt.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model = random_training_checkpoint(work / "ours", args.layers)
        model["generate_seconds"] = time.perf_counter() - t0
        runs = {"baseline (imports only)": measure("--baseline")}
        cases = [("megallama training -> megatron tp=2 pp=2 --distributed-optimizer",
                  ["convert", "--to", "megatron", "--tp", "2", "--pp", "2", "--distributed-optimizer", "--input",
                   work / "ours", "--output", work / "meg"]),
                 ("megatron tp=2 pp=2 distributed optimizer -> megallama training",
                  ["convert", "--from", "megatron", "--input", work / "meg", "--output", work / "back"])]
        for what, argv in cases:
            runs[what] = measure(*argv)
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
        dopt_bytes = sum(f.stat().st_size for f in (work / "meg").glob("iter_*/mp_rank_*/distrib_optim.pt"))
        result = {"model": model, "distrib_optim_bytes": dopt_bytes, "runs": runs,
                  "round_trip_bitwise_equal": _same(work / "ours", work / "back"), "host": socket.gethostname(),
                  "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                  "command": "python benchmarks/convert_memory_megatron_dopt.py " + " ".join(sys.argv[1:])}
        out = ROOT / "benchmarks" / "results" / "convert_memory_megatron_dopt.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _same(a: Path, b: Path) -> bool:
    """Masters and both moments came back bit for bit."""
    import torch

    from megallama.checkpoint.reshard import resolve_checkpoint
    from megallama.train.universal import UniversalReader

    x, y = (UniversalReader(resolve_checkpoint(p) / "universal") for p in (a, b))
    return set(x.names()) == set(y.names()) and all(
        torch.equal(x.full(n, k), y.full(n, k)) for n in x.names() for k in (None, "exp_avg", "exp_avg_sq"))


if __name__ == "__main__":
    main()
