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

import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _convert_memory_common import arguments, ROOT, child, env, run_cases, size_of, workdir, write_result

CHILD = child("import torch, safetensors, megallama.cli, megallama.checkpoint.ds_universal, deepspeed.checkpoint",
              {"--ds-to-universal": """
from argparse import Namespace
from deepspeed.checkpoint.ds_to_universal import main
main(Namespace(input_folder=sys.argv[2], output_folder=sys.argv[3], num_extract_workers=1, num_merge_workers=1,
               keep_temp_folder=False, strict=True, inject_missing_state=False))"""})


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


def main() -> None:
    args = arguments(__doc__, layers=12, vocab=16000)
    with workdir("convert_memory_dsuni.", args.workdir) as work:
        t0 = time.perf_counter()
        saved = train_and_save(work, args.layers, args.vocab)
        runs = run_cases(CHILD, [])  # the baseline
        runs["train 1 step + save (setup)"] = {"seconds": time.perf_counter() - t0}
        uni = work / "uni" / "step1"
        run_cases(CHILD, [
            ("DeepSpeed ds_to_universal (1 extract, 1 merge worker)", ["--ds-to-universal", saved, uni]),
            ("ds-universal -> megallama training checkpoint (streamed)",
             ["convert", "--from", "ds-universal", "--input", uni, "--output", work / "ours"]),
            ("ds-universal -> hf (streamed)",
             ["convert", "--from", "ds-universal", "--to", "hf", "--input", uni, "--output", work / "hf"]),
        ], runs)
        from megallama.checkpoint.ds_universal import DsUniversalReader

        reader = DsUniversalReader(uni)
        largest = max(reader.shapes.values(), key=math.prod)
        model = {"preset": "small", "n_layers": args.layers, "vocab_size": args.vocab,
                 "parameters": sum(math.prod(s) for s in reader.shapes.values()),
                 "ds_universal_bytes": size_of(uni), "output_bytes": size_of(work / "ours"),
                 "largest_tensor": list(largest)}
        write_result("convert_memory_dsuni", {"model": model, "runs": runs})


if __name__ == "__main__":
    main()
