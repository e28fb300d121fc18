"""A measured run: the trainer's start-up and step, one step at a time, with instruments attached.

``megallama profile`` and the measurement tests both go through here, so what the tests hold
against the cost models is what the command reports. :func:`setup` is the trainer's start-up
(``train.runtime.start``, the engine, the data iterator) without its logging and checkpointing;
:func:`run_step` runs the trainer's ``train_step`` (DeepSpeed's pipeline schedule when
``pp > 1``) under whichever instruments are given as hooks: a :class:`Timeline` (seconds per
phase / pipeline instruction, which also tells a ``SavedTensorMeter`` when backward runs) and
:class:`AfterForward` (marks a ``SavedTensorMeter``, snapshots a ``ModelStateMeter``), while a
``CommMeter`` wraps the collectives around them.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist

from megallama.train.hooks import HookList, Hooks
from megallama.train.runtime import Runtime

# pipeline instructions that are the stage's own compute (the rest of the schedule is waiting
# for or exchanging with neighbours, i.e. bubble when the stages are balanced)
PIPE_COMPUTE = ("ForwardPass", "BackwardPass")
PIPE_AFTER = ("ReduceGrads", "ReduceTiedGrads", "OptimizerStep")   # after the schedule proper


def random_batches(cfg, seed: int = 0) -> Iterator[torch.Tensor]:
    """Uniform random tokens ``[mbs, seq+1]``: enough to measure bytes and time, no data files."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1), generator=g)


def setup(cfg, batches: Optional[Iterator[torch.Tensor]] = None, fits: bool = False) -> Runtime:
    """Start (or join) the process group, build the layout's groups and engine, open the data.

    ``batches``: token batches to use instead of the run's data (tests pass random ones);
    ``fits``: refuse a model or batch this machine cannot hold before anything starts.
    """
    from megallama.train.runtime import on_device, open_datasets, start

    rt = start(cfg, fits=fits)
    rt.build()
    if batches is None:
        batches = rt.sampler(open_datasets(cfg)[0])
    rt.batches = on_device(batches, rt.device)
    return rt


class Timeline(Hooks):
    """Seconds per phase of a step (and per pipeline instruction); sets ``saved.in_backward``
    while backward runs."""

    def __init__(self, saved=None, sync: Optional[bool] = None):
        self.saved = saved
        self.sync = torch.cuda.is_available() if sync is None else sync
        self.seconds: Dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        backward = name in ("backward", "BackwardPass")
        if backward and self.saved is not None:
            self.saved.in_backward = True
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - start
            if backward and self.saved is not None:
                self.saved.in_backward = False

    def pipeline(self, engine):
        return _timed_pipeline(engine, self)

    def pipeline_bubble(self) -> Optional[float]:
        """Share of this stage's pipeline schedule not spent in its own forward/backward passes."""
        schedule = sum(v for k, v in self.seconds.items() if k not in PIPE_AFTER and k != "step")
        if "ForwardPass" not in self.seconds or schedule <= 0:
            return None
        return 1.0 - sum(self.seconds[k] for k in PIPE_COMPUTE) / schedule


def _timed_pipeline(engine, timeline: Timeline):
    """Time each pipeline instruction."""
    from megallama.train.deepspeed_patches import wrapped_pipeline_instructions

    def timed(kind, fn):
        def run(self, **kwargs):
            with timeline.phase(kind.__name__):
                return fn(self, **kwargs)
        return run

    return wrapped_pipeline_instructions(engine, timed)


class AfterForward(Hooks):
    """Marks ``saved`` (a ``SavedTensorMeter``) and snapshots ``states`` (a ``ModelStateMeter``)
    after each micro-batch's forward (non-pipeline runs), when both peak."""

    def __init__(self, saved=None, states=None):
        self.saved, self.states = saved, states

    @contextmanager
    def phase(self, name: str):
        yield
        if name == "forward":
            if self.saved is not None:
                self.saved.mark("forward")
            if self.states is not None:
                self.states.snapshot("after_forward")


def run_step(rt: Runtime, *hooks: Hooks) -> float:
    """One optimizer step; returns this rank's loss (the pipeline's last stage reports it)."""
    from megallama.train.step import train_step

    return float(train_step(rt, rt.batches, HookList(hooks)))


def census(s: Runtime) -> Dict[str, Any]:
    """One step under every byte-counting instrument (slow; not timed): collective payloads per
    group, live saved-activation bytes (end of forward, peak, recompute working set) and the
    engine's model-state bytes per category, on this rank."""
    from megallama.profiling.measure import SavedTensorMeter, tracking_checkpoints
    from megallama.profiling.measure_states import ModelStateMeter
    from megallama.profiling.measure_comm import CommMeter

    with SavedTensorMeter(s.module) as saved, tracking_checkpoints(s.module, saved), CommMeter(s.state) as comm, \
            ModelStateMeter(s.engine, s.module, s.state.dp_ranks) as ms:
        run_step(s, Timeline(saved, sync=False), AfterForward(saved, ms))
    return {"rank": s.state.rank, "stage": s.state.pp_rank, "collectives": comm.by_group(),
            "collective_calls": comm.table(), "model_states": ms.result(),
            "activations": {"forward_end": saved.marks.get("forward"), "peak": saved.peak,
                            "recompute_working": saved.backward_peak}}


def _peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def _cpu_rates(s: Runtime, budget_s: float = 1.0) -> Dict[str, float]:
    """This CPU as the run sees it, measured on every rank at once (so ranks sharing cores, or
    other jobs, show): GEMM FLOP/s and copy bandwidth per rank (medians over ranks), and the
    collective link over the world group; ``budget_s``: the GEMM's seconds (``train`` takes less)."""
    from megallama.profiling.hardware import measure_cpu_gemm_peak, measure_cpu_memory_bandwidth
    from megallama.profiling.measure_comm import measure_link
    from megallama.train.ds_config import precision

    dist.barrier()
    mine = [measure_cpu_gemm_peak.__wrapped__(precision(s.ds), budget_s),
            measure_cpu_memory_bandwidth.__wrapped__(0.3 * budget_s)]
    every = [None] * s.info.world_size
    dist.all_gather_object(every, mine)
    out = {"gemm_flops": statistics.median(x[0] for x in every),
           "memory_bandwidth": statistics.median(x[1] for x in every), "ranks": s.info.world_size}
    if s.info.world_size > 1:
        out.update(measure_link())
    return out


def profile(cfg, steps: int, warmup: int = 2, with_census: bool = True, comm_timing: bool = True,
            batches: Optional[Iterator[torch.Tensor]] = None) -> Optional[Dict[str, Any]]:
    """``megallama profile``: ``warmup`` untimed steps, on CPU a measurement of the machine as the
    ranks share it (:func:`_cpu_rates`; gloo is nothing like the CPU profile's assumed link),
    ``steps`` timed steps
    (collectives and pipeline instructions timed inside them), then one census step; returns
    the report on rank 0 (None elsewhere). ``comm_timing=False`` times the steps bare (on GPU the collective meter
    synchronises the device around each call, which hides any overlap)."""
    from megallama.profiling.compare import layout_of, predicted_census, side_by_side
    from megallama.profiling.measure import device_peak_bytes, reset_device_peak
    from megallama.profiling.measure_comm import CommMeter
    from megallama.profiling.report import build_report

    s = setup(cfg, batches, fits=True)
    cfg = s.cfg   # as started: train.micro_batch_size: auto chosen
    for _ in range(warmup):
        run_step(s)
    rates = _cpu_rates(s) if s.device.type == "cpu" else None
    reset_device_peak()
    comm = CommMeter(s.state, sync=None if comm_timing else False)
    comm.enabled = comm_timing
    timeline, step_times, losses = Timeline(sync=None if comm_timing else False), [], []
    with comm:
        for _ in range(steps):
            before = timeline.seconds["step"]
            losses.append(run_step(s, timeline))
            step_times.append(timeline.seconds["step"] - before)
    record: Dict[str, Any] = {
        "rank": s.state.rank, "stage": s.state.pp_rank, "step_times_s": step_times, "losses": losses,
        "comm_seconds": comm.seconds if comm_timing else None,
        "collectives": comm.by_group() if comm_timing else {}, "phases_s": dict(timeline.seconds),
        "pipeline_bubble": timeline.pipeline_bubble() if s.pipeline else None,
        "peak_device_bytes": device_peak_bytes(), "peak_rss_bytes": _peak_rss_bytes()}
    layout = layout_of(cfg, s.state, s.ds)
    if with_census:
        measured = census(s)
        predicted = predicted_census(cfg, layout, s.state.pp_rank, s.ds, s.device.type)
        record.update(census=measured, predicted_census=predicted, check=side_by_side(measured, predicted))
    records = [None] * s.info.world_size
    dist.all_gather_object(records, record)
    if s.state.rank != 0:
        return None
    return build_report(cfg, s, layout, records, steps, warmup, rates)
