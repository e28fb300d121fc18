#!/usr/bin/env python
"""Peak resident memory and time of ``megallama convert --from ds-universal`` on a >1 GB directory
written by DeepSpeed's own ``ds_to_universal``.

The directory is real, not synthesized: ``megallama train`` runs one ZeRO-1 step of the ``small``
preset at 12 layers and a 16,000-token vocabulary (the embedded corpus trains no larger one):
110 M parameters, fp32 weights plus two Adam moments = 1.3 GB under ``zero/`` (1.75 GB with the
model-states file the tool copies); it saves, and DeepSpeed's tool converts that save. Each
measurement is a fresh process reporting its own peak resident set (``VmHWM``, mapped file pages
included), beside a process that only imported what convert imports; DeepSpeed's tool is
measured the same way.

usage: python benchmarks/convert_memory_dsuni.py [--layers 12] [--vocab 16000] [--workdir /tmp]
Writes benchmarks/results/convert_memory_dsuni.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch, safetensors, megallama.cli, megallama.checkpoint.ds_universal, deepspeed.checkpoint
t0 = time.perf_counter()
if sys.argv[1] == "--ds-to-universal":
    from argparse import Namespace
    from deepspeed.checkpoint.ds_to_universal import main
    main(Namespace(input_folder=sys.argv[2], output_folder=sys.argv[3], num_extract_workers=1, num_merge_workers=1,
                   keep_temp_folder=False, strict=True, inject_missing_state=False))
elif sys.argv[1] != "--baseline":
    assert megallama.cli.main(sys.argv[1:]) == 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - t0}))
"""


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def measure(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{argv}: failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_and_save(work: Path, layers: int, vocab: int) -> Path:
    """One ZeRO-1 step on the embedded corpus, saved: DeepSpeed's files and ours."""
    cfg = {"run_dir": str(work / "run"),
           "model": {"preset": "small", "n_layers": layers, "vocab_size": vocab, "max_seq_len": 64},
           "parallel": {"tp": 1, "pp": 1},
           "train": {"steps": 1, "seed": 7, "seq_len": 64, "micro_batch_size": 1, "global_batch_size": 1,
                     "lr": 1e-3, "warmup_steps": 0, "log_every": 1},
           "data": {"cache_dir": str(work / "data"), "embedded_max_files": 40},
           "checkpoint": {"every": 1}, "deepspeed": str(ROOT / "ds_configs" / "zero1.json")}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "megallama", "train", str(work / "run.yaml")], env=env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training failed\n{proc.stderr[-3000:]}")
    return work / "run" / "checkpoints" / "step00000001"


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_dsuni.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        saved = train_and_save(work, args.layers, args.vocab)
        runs = {"baseline (imports only)": measure("--baseline"),
                "train 1 step + save (setup)": {"seconds": time.perf_counter() - t0}}
        cases = [
            ("DeepSpeed ds_to_universal (1 extract, 1 merge worker)",
             ["--ds-to-universal", saved, work / "uni" / "step1"]),
            ("ds-universal -> megallama training checkpoint (streamed)",
             ["convert", "--from", "ds-universal", "--input", work / "uni" / "step1", "--output", work / "ours"]),
            ("ds-universal -> hf (streamed)",
             ["convert", "--from", "ds-universal", "--to", "hf", "--input", work / "uni" / "step1", "--output",
              work / "hf"]),
        ]
        for what, argv in cases:
            runs[what] = measure(*argv)
            print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
        from megallama.checkpoint.ds_universal import DsUniversalReader

        reader = DsUniversalReader(work / "uni" / "step1")
        largest = max(reader.shapes.values(), key=math.prod)
        model = {"preset": "small", "n_layers": args.layers, "vocab_size": args.vocab,
                 "parameters": sum(math.prod(s) for s in reader.shapes.values()),
                 "ds_universal_bytes": size_of(work / "uni" / "step1"), "output_bytes": size_of(work / "ours"),
                 "largest_tensor": list(largest)}
        result = {"model": model, "runs": runs, "host": socket.gethostname(), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg(), "python": platform.python_version()}
        out = ROOT / "benchmarks" / "results" / "convert_memory_dsuni.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
