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


from _convert_memory_common import arguments, random_checkpoint, run_cases, timed, workdir, write_result
from convert_memory_megatron import CHILD, same_weights, save_consolidated


def main() -> None:
    args = arguments(__doc__, layers=16)
    with workdir("convert_memory_megatron_dist.", args.workdir) as work:
        model = timed(lambda: random_checkpoint(work / "ours", args.layers, save_consolidated))
        runs = run_cases(CHILD, [
            ("megallama bf16 -> megatron torch_dist (streamed write)",
             ["convert", "--to", "megatron", "--format", "torch_dist", "--input", work / "ours",
              "--output", work / "td"]),
            ("megatron torch_dist -> megallama (streamed read)",
             ["convert", "--from", "megatron", "--input", work / "td", "--output", work / "back"]),
        ])
        same = same_weights(work / "ours", work / "back")
        write_result("convert_memory_megatron_dist", {"model": model, "runs": runs, "round_trip_bitwise_equal": same})


if __name__ == "__main__":
    main()
