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

import shutil

from _convert_memory_common import arguments, child, random_checkpoint, run_cases, timed, workdir, write_result

CHILD = child("import torch, safetensors, megallama.cli, megallama.checkpoint.hf, megallama.checkpoint.consolidated",
              {"--load-whole": """  # the pre-streaming path: the whole model in memory, then written
from megallama.checkpoint.hf import load_hf
from megallama.checkpoint.consolidated import save_consolidated
cfg, state = load_hf(sys.argv[2])
save_consolidated(state, cfg, sys.argv[3])"""})


def save_sharded_hf(state, cfg, out) -> None:
    from megallama.checkpoint.hf import save_hf

    save_hf(state, cfg, out, max_shard_bytes=2 * 10**9)


def main() -> None:
    args = arguments(__doc__, layers=16)
    with workdir("convert_memory.", args.workdir) as work:
        model = timed(lambda: random_checkpoint(work / "hf", args.layers, save_sharded_hf))
        runs = run_cases(CHILD, [])  # the baseline
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
        for case in cases:
            run_cases(CHILD, [case], runs)
            for out in ("ours32", "whole"):
                shutil.rmtree(work / out, ignore_errors=True)
        write_result("convert_memory", {"model": model, "runs": runs})


if __name__ == "__main__":
    main()
