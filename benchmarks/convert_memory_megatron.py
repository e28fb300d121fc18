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

from pathlib import Path

from _convert_memory_common import arguments, child, random_checkpoint, run_cases, timed, workdir, write_result

CHILD = child("import torch, megallama.cli, megallama.checkpoint.megatron_files, megallama.checkpoint.consolidated",
              {"--load-whole": """  # a rank file read into memory, as torch.load without mmap does
from megallama.checkpoint.megatron_files import allowed_globals
with torch.serialization.safe_globals(allowed_globals()):
    data = torch.load(sys.argv[2], weights_only=True)"""})


def save_consolidated(state, cfg, out) -> None:
    from megallama.checkpoint.consolidated import save_consolidated

    save_consolidated(state, cfg, out)


def main() -> None:
    args = arguments(__doc__, layers=16)
    with workdir("convert_memory_megatron.", args.workdir) as work:
        model = timed(lambda: random_checkpoint(work / "ours", args.layers, save_consolidated))
        runs = run_cases(CHILD, [
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
        ])
        same = all(same_weights(work / "ours", work / b) for b in ("back11", "back22"))
        write_result("convert_memory_megatron", {"model": model, "runs": runs, "round_trip_bitwise_equal": same})


def same_weights(a: Path, b: Path) -> bool:
    """The weights came back bit for bit (compared a block of rows at a time)."""
    from megallama.checkpoint.consolidated import open_consolidated
    from megallama.checkpoint.streaming import equal

    (_, x), (_, y) = open_consolidated(a), open_consolidated(b)
    return set(x) == set(y) and all(equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    main()
