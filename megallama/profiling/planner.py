"""Choose a layout: enumerate TP/Ulysses/PP/DP/ZeRO/micro-batch/recompute/SP for a GPU count, keep
those the memory model says fit, predict each one's step time, rank by tokens/s.

Ulysses is searched like any degree, so at long sequences, where TP alone leaves too many
activations per rank or pays more in its all-gathers than Ulysses in its all-to-alls, the
plan proposes it. Context parallelism (``cp``), interleaved 1F1B (``interleave``), FP8 and
op-level recomputation are evaluated only when pinned: the trainer does not run them.

Any layout field can be pinned (``fixed``); pinning all of them evaluates that one layout,
fitting or not. ``pp`` need not divide the layers: stages split by the rule training uses
(:mod:`megallama.config.pipeline_split`), or by a pinned ``pipeline_layers`` list. The global
batch is given in tokens (LLaMA: 4M); a layout runs ``m = round(batch / (dp * mbs * seq))``
micro-batches and is kept only if that lands within 10% of it. A fully pinned layout that cannot
(say one micro-batch per replica already overshoots) is refused, not costed at another batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, Dict, Iterator, List, Optional

from megallama.config import layout_rules as rules
from megallama.errors import UserError
from megallama.profiling.activations import ActivationImpl
from megallama.profiling.arch import ArchSpec
from megallama.profiling.flops import RECOMPUTE_MODES, parameter_count
from megallama.profiling.hardware import HardwareProfile
from megallama.profiling.layout import (MAX_GPUS, Layout, cp_problem, divisors, dtype_problem,
                                        op_recompute_problem, pipeline_layers_problem)
from megallama.profiling.memory import memory_breakdown
from megallama.profiling.overheads import verdict
from megallama.profiling.steptime import Efficiency, StepPrediction, predict

DEFAULT_BATCH_TOKENS = 4 * 2 ** 20      # LLaMA's 4M-token batches
MAX_BATCH_TOKENS = 2 ** 40              # a trillion tokens per step: far past any published batch
MBS_CHOICES = (1, 2, 4, 8, 16)
BATCH_TOLERANCE = 0.10


@dataclass
class Plan:
    """Ranked fitting candidates (best first) and what was searched."""

    spec: ArchSpec
    gpus: int
    hardware: HardwareProfile
    seq: int
    batch_tokens: int
    candidates: List[StepPrediction] = field(default_factory=list)
    evaluated: int = 0
    smallest: Optional[StepPrediction] = None   # least memory among all evaluated (fit or not)

    @property
    def best(self) -> StepPrediction:
        return self.candidates[0]

    def as_dict(self, top: int = 20) -> Dict[str, Any]:
        best = self.best.as_dict()
        return {"model": self.spec.name, "parameters": parameter_count(self.spec), "gpus": self.gpus,
                "gpu": self.hardware.name, "seq": self.seq, "global_batch_tokens": self.batch_tokens,
                "evaluated": self.evaluated, "fitting": len(self.candidates), **best, "best": best,
                "candidates": [c.as_dict() for c in self.candidates[:top]]}


def _options(spec: ArchSpec, gpus: int, seq: int, gpn: int, fixed: Dict[str, Any],
             interleave: int = 1) -> Iterator[Dict[str, Any]]:
    shape = spec.shape
    tps = [t for t in divisors(gpn) if gpus % t == 0 and rules.tp_problem(shape, t) is None]
    pps = [p for p in divisors(gpus) if rules.pp_problem(shape, p, interleave) is None   # uneven stages too
           and (interleave == 1 or p > 1)]
    space = {"tp": tps, "ulysses": [u for u in divisors(gpus) if u <= spec.n_heads], "cp": [1], "pp": pps,
             "zero": [0, 1, 2, 3], "mbs": list(MBS_CHOICES), "recompute": list(RECOMPUTE_MODES),
             "sp": [False, True], "offload": [False]}
    for key, value in fixed.items():
        if key in space and value is not None:
            space[key] = [value]
    keys = ("tp", "ulysses", "cp", "pp", "zero", "mbs", "recompute", "sp", "offload")
    for tp, u, cp, pp, zero, mbs, rc, sp, off in product(*(space[k] for k in keys)):
        if rules.world_problem(gpus, {"tp": tp, "ulysses": u, "cp": cp, "pp": pp}):
            continue
        dp = gpus // (tp * u * cp * pp)
        if fixed.get("dp") is not None and dp != fixed["dp"]:
            continue
        if (rules.layout_problem(shape, tp, pp, sp, seq, zero, off, interleave, ulysses=u)
                or cp_problem(spec, tp, sp, seq, cp, u) or op_recompute_problem(spec, rc, u)):
            continue
        if dp * u * cp == 1 and zero > 0 and fixed.get("zero") is None:
            continue                       # nothing to shard over
        yield dict(tp=tp, ulysses=u, cp=cp, pp=pp, dp=dp, zero=zero, mbs=mbs, recompute=rc, sp=sp, offload=off)


def check_request(spec: ArchSpec, gpus: int, seq: int, fixed: Dict[str, Any], hw: Optional[HardwareProfile] = None,
                  interleave: int = 1, pipeline_partition: str = "parameters") -> None:
    """One-line errors for arguments no layout can satisfy."""
    if not 1 <= gpus <= MAX_GPUS:
        raise UserError(f"--gpus: expected 1 to {MAX_GPUS:,}, got {gpus}")
    given = {k: fixed[k] for k in ("tp", "ulysses", "cp", "pp", "dp", "mbs") if fixed.get(k) is not None}
    degrees = {k: v for k, v in given.items() if k != "mbs"}
    problems = [rules.positive_problem(k, v, rules.FLAGS) for k, v in given.items()]
    layers = fixed.get("pipeline_layers")
    if layers is not None:
        problems.append(pipeline_layers_problem(layers, spec.n_layers, degrees.get("pp", len(layers))))
    problem = next((p for p in problems if p), None) or rules.world_problem(gpus, degrees, rules.FLAGS)
    if problem is None and hw is not None:
        problem = dtype_problem(fixed.get("dtype") or "bf16", hw.peak_flops, hw.name)
    if problem is None and interleave > 1 and layers is not None:
        problem = pipeline_layers_problem(layers, spec.n_layers, len(layers), interleave)
    if problem:
        raise UserError(problem)
    zero = fixed.get("zero")
    pp = degrees.get("pp", 2 if interleave > 1 else 1)   # a free pp is searched among those > 1
    Layout(tp=degrees.get("tp", 1), pp=pp, dp=1, ulysses=degrees.get("ulysses", 1),
           cp=degrees.get("cp", 1), zero=1 if zero is None else zero, interleave=interleave,
           pipeline_partition=pipeline_partition, pipeline_layers=layers if len(layers or ()) == pp else None,
           mbs=given.get("mbs", 1), recompute=fixed.get("recompute") or "none", sp=bool(fixed.get("sp")),
           offload=bool(fixed.get("offload")), dtype=fixed.get("dtype") or "bf16").check(spec, seq)


def batch_problem(layout: Layout, seq: int, batch_tokens: int, given: bool) -> Optional[str]:
    """A pinned layout costed at another batch than asked would mislead: name the nearest it runs."""
    step = layout.dp * layout.mbs * seq
    m = max(1, round(batch_tokens / step))
    if abs(m * step - batch_tokens) <= BATCH_TOLERANCE * batch_tokens:
        return None
    flag = f"--global-batch-tokens {batch_tokens:,}" + ("" if given else " (the default)")
    return (f"{flag}: the pinned layout runs dp {layout.dp} x mbs {layout.mbs} x seq {seq} = {step:,} tokens per "
            f"micro-batch step, no whole number of which is within {BATCH_TOLERANCE:.0%} of it; expected a multiple "
            f"of {step:,} (e.g. {m * step:,}) or a smaller --dp/--mbs")


def plan(spec: ArchSpec, gpus: int, hw: HardwareProfile, seq: Optional[int] = None,
         batch_tokens: Optional[int] = None, gpus_per_node: Optional[int] = None, dtype: str = "bf16",
         eff: Efficiency = Efficiency(), impl: Optional[ActivationImpl] = None, scatter_gather: Any = False,
         interleave: int = 1, pipeline_partition: str = "parameters", **fixed: Any) -> Plan:
    """Rank every layout of ``gpus`` GPUs that fits; ``fixed`` pins any of tp, ulysses, cp, pp, dp,
    zero, mbs, recompute, sp, offload, pipeline_layers (blocks per stage; pins pp to its length). ``impl``:
    which implementation's activations to count (default: ours on the profile's device), and
    ``scatter_gather`` how its stages exchange activations (:func:`megallama.profiling.comm.pipe_exchange`);
    ``interleave``: virtual pipeline chunks (costed only, never searched). Raises ``UserError``
    when nothing fits."""
    impl = impl or ActivationImpl.for_device("cpu" if hw.measured else "cuda")
    seq = spec.max_seq_len if seq is None else seq
    gpn = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    batch_given = batch_tokens is not None
    batch_tokens = DEFAULT_BATCH_TOKENS if batch_tokens is None else batch_tokens
    for flag, value, top in (("--gpus-per-node", gpn, MAX_GPUS),
                             ("--global-batch-tokens", batch_tokens, MAX_BATCH_TOKENS)):
        if value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
        if value > top:
            raise UserError(f"{flag}: expected at most {top:,}, got {value}")
    layers = fixed.pop("pipeline_layers", None)
    if layers is not None:
        layers = tuple(layers)
        fixed["pp"] = len(layers) if fixed.get("pp") is None else fixed["pp"]
    check_request(spec, gpus, seq, {**fixed, "dtype": dtype, "pipeline_layers": layers}, hw, interleave,
                  pipeline_partition)
    result = Plan(spec=spec, gpus=gpus, hardware=hw, seq=seq, batch_tokens=batch_tokens)
    single = all(fixed.get(k) is not None for k in ("tp", "pp", "zero", "mbs", "recompute"))
    if single:   # a fully given layout: SP and offload are off unless asked for
        fixed = {**fixed, "sp": bool(fixed.get("sp")), "offload": bool(fixed.get("offload")),
                 "ulysses": fixed.get("ulysses") or 1, "cp": fixed.get("cp") or 1}
    for opt in _options(spec, gpus, seq, gpn, fixed, 1 if layers is not None else interleave):
        step = opt["dp"] * opt["mbs"] * seq
        m = round(batch_tokens / step)
        layout = Layout(**opt, grad_accum=max(1, m), dtype=dtype, gpus_per_node=gpn, pipeline_layers=layers,
                        interleave=interleave, pipeline_partition=pipeline_partition)
        problem = batch_problem(layout, seq, batch_tokens, batch_given)
        if problem:
            if single:
                raise UserError(problem)
            continue
        mem = memory_breakdown(spec, layout, seq, impl=impl)
        result.evaluated += 1
        if not verdict(spec, layout, seq, hw, mem, impl).fits and not single:
            if result.smallest is None or mem.total < result.smallest.memory.total:
                result.smallest = predict(spec, layout, seq, hw, eff, impl, scatter_gather, memory=mem)
            continue
        result.candidates.append(predict(spec, layout, seq, hw, eff, impl, scatter_gather, memory=mem))
    result.candidates.sort(key=lambda p: (not p.fits, -p.tokens_per_s_per_gpu, p.memory.total))
    if not result.candidates:
        if result.smallest is None:
            raise UserError(f"no layout of {gpus} GPUs matches the given options and a global batch of "
                            f"{batch_tokens:,} tokens in sequences of {seq} (try --global-batch-tokens)")
        s = result.smallest
        v = s.memory_verdict
        raise UserError(f"no layout of {gpus} x {hw.name} fits {spec.name}: the smallest needs "
                        f"{v.needed_bytes / 2 ** 30:.1f} GiB per GPU ({s.layout.describe()}) of "
                        f"{v.usable_bytes / 2 ** 30:.1f} GiB usable"
                        + ("; try --offload" if not fixed.get("offload") else ""))
    return result
