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

import shutil
from pathlib import Path

from _convert_memory_common import arguments, child, llama_1b, random_state, run_cases, timed, workdir, write_result

CHILD = child("import torch, torch.distributed.checkpoint, megallama.cli, megallama.checkpoint.dcp_convert")


def _describe(state, what: str) -> dict:
    largest = max(state.values(), key=lambda t: t.numel())
    return {"what": what, "parameters": sum(t.numel() for t in state.values()),
            "largest_tensor": list(largest.shape),
            "largest_tensor_mb": largest.numel() * largest.element_size() / 2**20}


def weights_checkpoint(out: Path, layers: int) -> dict:
    import torch

    from megallama.checkpoint.consolidated import save_consolidated

    cfg = llama_1b(layers)
    state = random_state(cfg, torch.bfloat16, positive=True)
    save_consolidated(state, cfg, out)
    return {**_describe(state, f"llama3.2-1b shape, {layers} layers, bf16 weights"),
            "bytes": sum(t.numel() * 2 for t in state.values())}


def training_dcp(out: Path, layers: int) -> dict:
    """A torchtitan-named DCP with fp32 weights, both Adam moments and a step, written streamed."""
    import torch

    from megallama.checkpoint.dcp import MOMENTS, OPT, save_titan, to_titan
    from megallama.checkpoint.dcp_convert import optimizer_values

    cfg = llama_1b(layers, vocab_size=32000)
    weights = random_state(cfg, torch.float32, positive=True)
    tensors = to_titan(weights, cfg)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for m in MOMENTS:
        tensors.update({OPT + k: v for k, v in to_titan(random_state(cfg, torch.float32, positive=True), cfg,
                                                        "." + m).items()})
    tensors.update({f"{OPT}{n}.step": torch.tensor(100.0) for n in shapes})
    save_titan(out, tensors, optimizer_values(shapes, 100, 0, None), cfg)
    return {**_describe(weights, f"llama3.2-1b shape, vocab 32000, {layers} layers, fp32 weights + Adam moments"),
            "bytes": sum(t.numel() * 12 for t in weights.values())}


def main() -> None:
    args = arguments(__doc__, layers=8, train_layers=2)
    with workdir("convert_memory_dcp.", args.workdir) as work:
        models = {"weights": timed(lambda: weights_checkpoint(work / "ours", args.layers))}
        runs = run_cases(CHILD, [
            ("weights: megallama consolidated bf16 -> dcp",
             ["convert", "--to", "dcp", "--input", work / "ours", "--output", work / "titan"], work / "titan"),
            ("weights: dcp bf16 -> megallama consolidated",
             ["convert", "--from", "dcp", "--input", work / "titan", "--output", work / "back"], work / "back"),
        ])
        for d in ("ours", "titan", "back"):
            shutil.rmtree(work / d, ignore_errors=True)
        models["training"] = timed(lambda: training_dcp(work / "titan_train", args.train_layers))
        run_cases(CHILD, [
            ("training: dcp fp32 + Adam -> megallama training checkpoint",
             ["convert", "--from", "dcp", "--input", work / "titan_train", "--output", work / "train"], work / "train"),
            ("training: megallama training checkpoint -> dcp fp32 + Adam",
             ["convert", "--to", "dcp", "--input", work / "train", "--output", work / "titan_back"],
             work / "titan_back"),
        ], runs)
        write_result("convert_memory_dcp", {"models": models, "runs": runs})


if __name__ == "__main__":
    main()
