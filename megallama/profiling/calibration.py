"""The fit of :class:`~megallama.profiling.steptime.Efficiency`'s constants on published runs.

One fit for all generations: the large-GEMM ceiling, the elementwise traffic (eager PyTorch and
Megatron's fused kernels), and by GPU generation the flash kernels' fraction of peak, the
H100's sustained clock (of the A100's) and the compute ZeRO-3's hidden exchange costs, on a stated
subset (Megatron Table 1's calibration rows, :data:`published_runs.CALIBRATION`'s MPT rows);
everything else is held out (benchmarks/README_planner.md). The shipped defaults are what
:func:`calibrate` finds (tests/test_profiling_validation.py).
"""
from __future__ import annotations

import dataclasses
import math

from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.memory import memory_breakdown
from megallama.profiling.published import CALIBRATION_ROWS, MEGATRON_IMPL, MEGATRON_TABLE1, SEQ
from megallama.profiling.published_runs import PUBLISHED_RUNS, hardware, is_calibration
from megallama.profiling.steptime import Efficiency, predict

SCALARS = ("gemm", "traffic", "traffic_fused")
NEUTRAL = Efficiency(gemm=0.66, traffic=2.0, traffic_fused=2.0, attention=(("a100", 0.5), ("h100", 0.3)),
                     clock=(("a100", 1.0), ("h100", 1.0)),
                     contention=(("a100", 0.0), ("h100", 0.0)))   # where the fit starts
GRIDS = {"gemm": [x / 100 for x in range(60, 100)], "traffic": [x / 4 for x in range(0, 25)],
         "traffic_fused": [x / 4 for x in range(0, 25)], "clock.h100": [x / 100 for x in range(60, 101)],
         "attention.a100": [x / 100 for x in range(20, 91)], "attention.h100": [x / 100 for x in range(10, 71)],
         "contention.a100": [x / 100 for x in range(0, 101)], "contention.h100": [x / 100 for x in range(0, 101)]}


def _get(eff: Efficiency, name: str) -> float:
    if name in SCALARS:
        return getattr(eff, name)
    table, gen = name.split(".")
    return dict(getattr(eff, table))[gen]


def _with(eff: Efficiency, name: str, value: float) -> Efficiency:
    if name in SCALARS:
        return dataclasses.replace(eff, **{name: value})
    field, gen = name.split(".")
    table = dict(getattr(eff, field))
    table[gen] = value
    return dataclasses.replace(eff, **{field: tuple(sorted(table.items()))})


def calibrate(start: Efficiency = NEUTRAL) -> Efficiency:
    """Coordinate descent on :data:`GRIDS`, each step to the neighbouring grid value that lowers
    the squared log error on the fit rows, in two stages: the compute constants on the rows that
    run inside one node (Megatron Table 1's calibration rows, best micro-batch as
    :func:`~megallama.profiling.published.predict_row`, whose data parallelism is not ZeRO-3, and
    :data:`CALIBRATION`'s 8-GPU rows); then, with those fixed, ``contention`` on
    :data:`CALIBRATION`'s rows whose ZeRO-3 ring spans nodes; again until neither moves (the
    8-GPU rows' ZeRO-3 contends too)."""
    a100 = load_hardware("a100-80gb")
    cases = []   # (spec, seq, layouts to pick the best of, hw, impl, scatter_gather, published, metric, spans)
    for r in (r for r in MEGATRON_TABLE1 if r.params_b in CALIBRATION_ROWS):
        per_replica = r.batch // r.dp
        lays = [Layout(tp=r.tp, pp=r.pp, dp=r.dp, zero=0, mbs=m, grad_accum=per_replica // m, recompute="full",
                       dtype="fp16", gpus_per_node=a100.gpus_per_node) for m in (1, 2, 4, 8) if per_replica % m == 0]
        cases.append((r.spec(), SEQ, lays, a100, MEGATRON_IMPL, True, r.tflops_per_gpu, "hardware_tflops_per_gpu",
                      False))
    for r in (r for r in PUBLISHED_RUNS if is_calibration(r)):
        hw = hardware(r)
        cases.append((r.spec(), r.seq, [r.layout(hw)], hw, r.impl, False, r.tokens_per_s_per_gpu, "tokens_per_s_per_gpu",
                      r.gpus > hw.gpus_per_node))
    mem = {(i, j): memory_breakdown(c[0], lay, c[1], impl=c[4]) for i, c in enumerate(cases)
           for j, lay in enumerate(c[2])}   # memory does not depend on the constants

    def predicted(i: int, eff: Efficiency) -> float:
        spec, seq, lays, hw, impl, sg, _, metric, _ = cases[i]
        preds = [predict(spec, lay, seq, hw, eff, impl, scatter_gather=sg, memory=mem[i, j])
                 for j, lay in enumerate(lays)]
        return max(getattr(p, metric) for p in preds if p.fits or len(preds) == 1)

    point, before = start, None
    while point != before:
        before = point
        for spans in (False, True):
            names = [n for n in GRIDS if n.startswith("contention.") == spans]
            rows = [i for i, c in enumerate(cases) if c[8] == spans]
            point = _descend(point, names,
                             lambda eff: sum(math.log(predicted(i, eff) / cases[i][6]) ** 2 for i in rows))
    return point


def _descend(point: Efficiency, names, loss) -> Efficiency:
    point_loss = loss(point)
    moved = True
    while moved:
        moved = False
        for name in names:
            grid = GRIDS[name]
            now = _get(point, name)
            i = min(range(len(grid)), key=lambda j: abs(grid[j] - now))
            for step in (1, -1):
                while 0 <= i + step < len(grid):
                    cand = _with(point, name, grid[i + step])
                    cand_loss = loss(cand)
                    if cand_loss >= point_loss - 1e-12:
                        break
                    point, point_loss, i, moved = cand, cand_loss, i + step, True
    return point
