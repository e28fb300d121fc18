#!/usr/bin/env python
"""The activation model under Ulysses against what autograd saves in ``megallama.model``.

Each case starts ``tp x ulysses`` gloo ranks on CPU, runs one forward of a tiny preset (seq 64,
two sequences) and counts the distinct storages autograd saves on rank 0 (less parameters, RoPE's
cached tables and 0-d scalars, as tests/test_profiling_activations.py does), beside
``profiling.memory.stage_activation_bytes`` for the same layout. Prints one line per case and
exits non-zero on any difference.

    .venv/bin/python benchmarks/ulysses_activation_check.py      # ~1 min on 2 cores
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ, MBS = 64, 2
CASES = [(1, 2, False, "tiny", "fp32", "none"), (1, 2, False, "tiny-gqa", "bf16", "none"),
         (1, 4, False, "tiny-gqa", "bf16", "none"), (1, 2, False, "tiny", "bf16", "selective"),
         (1, 2, False, "tiny-gqa", "bf16", "full"), (2, 2, True, "tiny-gqa", "bf16", "none"),
         (2, 2, False, "tiny", "fp32", "none")]


def _rank(rank, world, case, port, queue) -> None:
    tp, u, sp, name, dtype, recompute = case
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel.random import checkpoint
    from megallama.parallel.state import initialize
    from megallama.profiling import activations as act
    from megallama.profiling.layout import Layout
    from megallama.profiling.memory import stage_activation_bytes

    cfg = ModelConfig.preset(name)
    model = build_model(cfg, initialize(tp=tp, ulysses=u, sequence_parallel=sp))
    model = model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    for layer in model.layers:
        if recompute == "full":
            layer.checkpoint_fn = functools.partial(checkpoint, model.parallel_state.rng)
        layer.attention.recompute_core = recompute == "selective"
    torch.manual_seed(0)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (MBS, SEQ)) for _ in range(2))
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for m in model.modules():
        for pair in getattr(m, "_cache", {}).values():
            skip |= {t.untyped_storage().data_ptr() for t in pair}
    measured = sum(n for ptr, n in seen.items() if ptr not in skip and n > 16)
    impl = act.ActivationImpl.for_device("cpu")
    layout = Layout(tp=tp, sp=sp, ulysses=u, mbs=MBS, dtype=dtype, recompute=recompute)
    d = stage_activation_bytes(cfg, layout, SEQ, 0, impl)
    transient = sum(x.bytes for x in act.last_stage_saved_tensors(cfg, SEQ // u, MBS, tp, sp, layout.dtype_bytes, impl)
                    if not x.saved)
    if rank == 0:
        queue.put((measured, d["blocks"] + d["embedding"] + d["head_and_loss"] - transient))
    dist.destroy_process_group()


def main() -> int:
    ctx, bad = mp.get_context("spawn"), 0
    for i, case in enumerate(CASES):
        world, queue = case[0] * case[1], ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world, case, 29700 + i, queue)) for r in range(world)]
        for p in procs:
            p.start()
        measured, predicted = queue.get(timeout=300)
        for p in procs:
            p.join()
        bad += measured != predicted
        print(f"tp{case[0]}{'+sp' if case[2] else ''} u{case[1]} {case[3]} {case[4]} rc={case[5]}: "
              f"measured {measured} B, predicted {predicted:.0f} B, difference {measured - predicted:+.0f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
