"""Communication per step: which collectives a layout issues, their bytes, and their time.

``payload_bytes`` of one call is the *unsharded* tensor: the all-reduced tensor, the gathered
output of an all-gather, the input of a reduce-scatter, the tensor sent by a send. That is what
a wrapper around ``torch.distributed`` sees (``all_gather(parts, x)``: ``x.nbytes * world``), so
a measured step can be compared group by group with :func:`collective_bytes_per_step`.
``wire_bytes`` is what one rank sends under a ring: ``2(n-1)/n`` of the payload for all-reduce,
``(n-1)/n`` for all-gather and reduce-scatter, all of it for a send.

Counted per step, on one rank of pipeline stage ``stage`` (``m`` micro-batches, ``N = s*b``
tokens each, ``h`` hidden, ``w`` bytes of the model dtype, ``P`` parameters on the rank; the
stage's own blocks, ``Layout.stage_layers``):

* tp, per block and micro-batch: without SP 2 all-reduces forward (after Wo, W2) and 2 backward
  (the inputs of QKV and W1|W3), +2 forward with full recomputation; with SP the same points
  all-gather/reduce-scatter instead (forward AG, RS; backward RS, AG). Plus the embedding's
  reduction, the LM head input's backward reduction, the loss's three fp32 all-reduces of ``N``
  values, and with SP one all-reduce per norm of its gain's gradient (``megallama.model``'s
  RMSNorm routes the gain through copy-to-TP). Checked call for call against a gloo TP=2 run.
* pp: the boundary activation forward and its gradient backward, ``N h w`` (``/t`` with SP or
  Megatron's scatter/gather; DeepSpeed's pipeline engine also sends ``1/t`` under TP and adds
  TP all-gathers, :func:`pipe_exchange`), per micro-batch per neighbour. Interleaved 1F1B
  (``v`` chunks per rank) sends ``v`` times as many messages of the same size (Narayanan et al.
  2021, sec. 2.2.2): every chunk's boundary crosses ranks, the first rank's first chunk and the
  last rank's last chunk excepted, so the first and last ranks also exchange with each other.
  A tied embedding (GPT, Llama 3.2) adds one all-reduce of its gradient between the first and
  last stage per step.
* kv: with fewer KV heads than TP ranks, per block and micro-batch the owner of each replicated
  head broadcasts it to the ``tp / kv`` ranks holding it (forward, again in a full recompute)
  and their gradients are reduced onto it (backward), as ``parallel.mappings.from_first_rank`` does.
* ulysses, cp: :mod:`megallama.profiling.sequence_comm`.
* dp (over DP x the Ulysses or CP ranks, ``Layout.zero_dp``): ZeRO-0 one all-reduce of the gradients; ZeRO-1 reduces them once per step and all-gathers
  the updated params; ZeRO-2 reduces every micro-batch (DeepSpeed 0.19 all-reduces each
  partition's slice of a bucket, so the wire carries an all-reduce's bytes, not a
  reduce-scatter's -- measured on a gloo run); ZeRO-3 all-gathers the
  params in forward every micro-batch, again in backward those farther than
  ``stage3_max_reuse_distance`` from their backward use (:func:`zero3_backward_gather`), and
  reduce-scatters every micro-batch.
  DeepSpeed's bf16 pipeline optimizer (ZeRO "0") all-reduces, then all-gathers the params.

DP collectives are split into DeepSpeed's buckets (``reduce_bucket_size`` 5e8 elements; ZeRO-3
gathers ``stage3_prefetch_bucket_size`` 5e7 at a time, at least one call per block), which sets
how many latency terms a step pays; PyTorch FSDP (``Layout.framework``, published runs) issues
one call per wrapped block instead (:func:`fsdp_collectives`). Times: ring ``alpha * steps + wire / busbw``, ``busbw`` the
achievable bus bandwidth, ``bus_efficiency`` of the link for large calls and less for small ones
(:func:`megallama.profiling.efficiency.achievable_bandwidth`); all-reduce may take a tree's
``2 log2 n`` latency steps when fewer (NCCL
all-gather and reduce-scatter are ring-only). A group inside one node runs at NVLink speed; one that spans nodes at
``min(NVLink, members_per_node * NIC)`` (each GPU has its own NIC; a ring's traffic out of a
node spreads over the NICs of its members there).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List

from megallama.profiling.activations import ActivationImpl
from megallama.profiling.efficiency import achievable_bandwidth, message_half
from megallama.profiling.arch import SpecLike, as_spec
from megallama.profiling.hardware import HardwareProfile
from megallama.profiling.layout import DTYPE_BYTES, Layout, members_per_node, spans_nodes
from megallama.profiling.memory import layer_params_per_rank, params_per_rank, zero3_backward_gather
from megallama.profiling.sequence_comm import all_to_all_time, ring_collectives, ulysses_collectives
from megallama.train.ds_settings import Buckets

GROUPS = ("tp", "pp", "dp", "embedding", "kv", "ulysses", "cp")
REDUCE_BUCKET = 5e8      # DeepSpeed reduce_bucket_size / allgather_bucket_size (elements)
PREFETCH_BUCKET = 5e7    # DeepSpeed stage3_prefetch_bucket_size (elements)


@dataclass(frozen=True)
class Collective:
    group: str            # tp | pp | dp | embedding | kv (the TP ranks sharing a replicated KV head) | ulysses | cp
    op: str               # all_reduce | all_gather | reduce_scatter | broadcast | reduce | send | recv | all_to_all
    payload_bytes: float  # per call (see module docstring)
    calls: float          # per step
    phase: str            # "microbatch": on each micro-batch's critical path; "step": after the
    #                       last backward; "overlap": may hide behind compute (ZeRO-3 prefetch);
    #                       "ring": ring attention's sends, hidden behind the attention core
    what: str = ""
    members: int = 0      # ranks in the group, where not the layout's (``kv``: tp / kv_heads)


def _tp_collectives(spec, layout: Layout, seq: int, stage: int, impl: ActivationImpl) -> List[Collective]:
    if layout.tp == 1:
        return []
    m, w, sp = layout.grad_accum, layout.dtype_bytes, layout.sp
    act = seq * layout.mbs * spec.dim * w / layout.seq_shards   # this rank's tokens
    out: List[Collective] = []
    encdec = spec.arch == "encoder_decoder"
    blocks = layout.stage_layers(spec)[stage] + (spec.n_encoder_layers if encdec and stage == 0 else 0)
    fwd = 2 * blocks * (2 if layout.recompute == "full" else 1)
    bwd = 2 * blocks
    cross_f = spec.n_layers * (2 if layout.recompute == "full" else 1) if encdec else 0
    cross_b = 2 * spec.n_layers if encdec else 0
    if not sp:
        out.append(Collective("tp", "all_reduce", act, m * (fwd + cross_f + bwd + cross_b), "microbatch", "blocks"))
    else:
        regather = 0 if impl.sp_saves_gathered_input else 2 * blocks
        ag = fwd + bwd + regather + (2 * cross_f + cross_b // 2 if encdec else 0)
        rs = fwd + bwd + (cross_f + cross_b if encdec else 0)
        out += [Collective("tp", "all_gather", act, m * ag, "microbatch", "blocks"),
                Collective("tp", "reduce_scatter", act, m * rs, "microbatch", "blocks")]
    if stage == 0:
        n_emb = 2 if encdec else 1
        op = "reduce_scatter" if sp else "all_reduce"
        out.append(Collective("tp", op, act, m * n_emb, "microbatch", "embedding output"))
        if sp:
            out.append(Collective("tp", "all_gather", act, m * n_emb, "microbatch", "embedding grad"))
    if stage == layout.pp - 1:
        out.append(Collective("tp", "all_reduce" if not sp else "reduce_scatter", act, m, "microbatch",
                              "lm head input grad"))
        if sp:
            out.append(Collective("tp", "all_gather", act, m, "microbatch", "lm head input"))
        out.append(Collective("tp", "all_reduce", seq * layout.mbs * 4 / layout.seq_shards, 3 * m, "microbatch",
                              "loss max/target/sum"))
    if layout.recompute == "full" and impl.partition_activations and not sp:
        # DeepSpeed keeps 1/t of each checkpointed block input and all-gathers it back in backward
        out.append(Collective("tp", "all_gather", act, m * blocks, "microbatch", "partitioned checkpoint inputs"))
    if sp:  # each RMSNorm routes its gain through copy-to-TP: one all-reduce per norm in backward
        if encdec:   # decoder blocks have 3 norms, encoder blocks 2, plus both final norms
            norms = 3 * spec.n_layers + 2 * spec.n_encoder_layers + 2
        else:
            norms = 2 * blocks + (1 if stage == layout.pp - 1 else 0)
        out.append(Collective("tp", "all_reduce", spec.norm_params * w, m * norms, "microbatch",
                              "sequence-parallel norm gain grads"))
    return out


def pipe_exchange(layout: Layout, scatter_gather) -> str:
    """How pipeline stages exchange a boundary tensor: ``whole``; ``megatron`` (``True``: each TP
    rank sends 1/t, the receiver all-gathers; none under SP, already sharded); ``deepspeed``
    (its pipeline engine with TP: 1/t sent, the receiver all-gathers, and the sender all-gathers
    its own freed output again for backward -- measured on a gloo PP=2 x TP=2 run). Under sequence
    parallelism our DeepSpeed config turns that partitioning off (TP ranks hold different shards):
    ``whole`` again."""
    if layout.tp == 1 or layout.pp == 1 or not scatter_gather or (scatter_gather == "deepspeed" and layout.sp):
        return "whole"
    return "deepspeed" if scatter_gather == "deepspeed" else "megatron"


def _pipe_tp_gathers(spec, layout: Layout, seq: int, stage: int, scatter_gather) -> List[Collective]:
    mode = pipe_exchange(layout, scatter_gather)
    if mode == "whole" or (mode == "megatron" and layout.sp):
        return []
    m = layout.grad_accum
    boundary = seq * layout.mbs * spec.dim * layout.dtype_bytes / (layout.tp if layout.sp else 1) / layout.seq_shards
    behind, ahead = _chunk_neighbours(layout, stage)
    per_mb = behind + ahead * (2 if mode == "deepspeed" else 1)
    return [Collective("tp", "all_gather", boundary, m * per_mb, "microbatch", "partitioned pipeline exchange")]


def _chunk_neighbours(layout: Layout, stage: int):
    """(messages each way with the previous rank, with the next) per micro-batch: one per chunk
    boundary that crosses ranks; the first rank's first chunk and the last rank's last chunk have
    none (under interleaving the first and last ranks are each other's neighbours)."""
    v = layout.interleave
    return (v if stage > 0 else v - 1), (v if stage < layout.pp - 1 else v - 1)


def _pp_collectives(spec, layout: Layout, seq: int, stage: int, scatter_gather) -> List[Collective]:
    if layout.pp == 1:
        return []
    m = layout.grad_accum
    act = seq * layout.mbs * spec.dim * layout.dtype_bytes / (layout.tp if layout.sp else 1) / layout.seq_shards
    mode = pipe_exchange(layout, scatter_gather)
    if mode == "deepspeed" or (mode == "megatron" and not layout.sp):
        act /= layout.tp
    out: List[Collective] = []
    behind, ahead = (m * k for k in _chunk_neighbours(layout, stage))
    if ahead:
        out += [Collective("pp", "send", act, ahead, "microbatch", "activation to next stage"),
                Collective("pp", "recv", act, ahead, "microbatch", "gradient from next stage")]
    if behind:
        out += [Collective("pp", "recv", act, behind, "microbatch", "activation from previous stage"),
                Collective("pp", "send", act, behind, "microbatch", "gradient to previous stage")]
    if spec.tied_embeddings and stage in (0, layout.pp - 1):
        emb = spec.vocab_size * spec.dim / layout.tp * layout.dtype_bytes
        out.append(Collective("embedding", "all_reduce", emb, 1, "step", "tied embedding grad"))
    return out


def _kv_collectives(spec, layout: Layout, stage: int) -> List[Collective]:
    """With fewer KV heads than TP ranks each head's weights sit on ``tp / kv`` ranks; the first
    owns it: every forward takes its value (a broadcast) and every backward sums the copies'
    gradients onto it (a reduce), per block and micro-batch."""
    if spec.kv_heads >= layout.tp:
        return []
    per_block = 2 * spec.head_dim * (spec.dim + (1 if spec.bias else 0))   # one K and one V head per rank
    calls = layout.stage_layers(spec)[stage] * layout.grad_accum
    size, n = per_block * layout.dtype_bytes, layout.tp // spec.kv_heads
    forwards = 2 if layout.recompute == "full" else 1
    return [Collective("kv", "broadcast", size, calls * forwards, "microbatch", "replicated KV heads from their owner",
                       members=n),
            Collective("kv", "reduce", size, calls, "microbatch", "replicated KV head grads onto their owner",
                       members=n)]


def _bucketed(group: str, op: str, total_bytes: float, elements: float, bucket: float, times: float,
              phase: str, what: str, min_calls: int = 1) -> Collective:
    """DeepSpeed issues one call per bucket of ``bucket`` elements (ZeRO-3: at least one per block)."""
    calls = max(min_calls, math.ceil(elements / bucket))
    return Collective(group, op, total_bytes / calls, times * calls, phase, what)


def _dp_collectives(spec, layout: Layout, stage: int,
                    reuse_distance: float = Buckets.reuse_distance) -> List[Collective]:
    if layout.zero_dp == 1:   # gradients are reduced over DP x the sequence shards
        return []
    m, w = layout.grad_accum, layout.dtype_bytes
    split = layout.stage_layers(spec)
    n_params = params_per_rank(spec, layout.tp, layout.pp, stage, split)
    size = n_params * w
    z = layout.effective_zero

    def reduce(op: str, times: float, what: str) -> Collective:
        return _bucketed("dp", op, size, n_params, REDUCE_BUCKET, times, "step", what)

    gather_params = Collective("dp", "all_gather", size, 1, "step", "updated params")
    if layout.traits.optimizer == "bf16":   # DeepSpeed BF16_Optimizer (bf16 + pipeline)
        return [reduce("all_reduce", 1, "grads"), gather_params]
    if z == 0:
        return [reduce("all_reduce", 1, "grads")]
    if z == 1:   # DeepSpeed all-reduces each partition's slice of a bucket (no reduce-scatter)
        return [reduce("all_reduce", 1, "grads"), gather_params]
    if z == 2:
        return [reduce("all_reduce", m, "grads, every micro-batch"), gather_params]
    blocks = split[stage]
    if layout.framework != "deepspeed":
        return fsdp_collectives(spec, layout, n_params, blocks)
    out = [_bucketed("dp", "all_gather", size, n_params, PREFETCH_BUCKET, m, "overlap", "params, forward",
                     min_calls=blocks)]
    again = zero3_backward_gather(spec, layout.tp, layout.pp, stage, reuse_distance, split)
    if again:
        out.append(_bucketed("dp", "all_gather", again * w, again, PREFETCH_BUCKET, m, "overlap",
                             "params, again in backward", min_calls=max(1, round(blocks * again / n_params))))
    out.append(_bucketed("dp", "reduce_scatter", size, n_params, REDUCE_BUCKET, m, "overlap",
                         "grads, every micro-batch"))
    return out


def fsdp_collectives(spec, layout: Layout, n_params: float, blocks: int) -> List[Collective]:
    """PyTorch FSDP ``FULL_SHARD`` with each block wrapped (MPT's Composer, torchtitan) issues one
    all-gather and one reduce-scatter per block and micro-batch, whatever its size, plus the
    root's (embedding, final norm, head): not DeepSpeed's buckets. Backward gathers each block
    again, since it was freed after forward; ``fsdp`` (FSDP1, Composer) keeps the root gathered
    through backward, ``fsdp2`` (torchtitan, ``parallelize_llama.apply_fsdp``) keeps the last
    block and frees the root. Gradients are reduce-scattered in ``layout.reduce_dtype``."""
    m, w = layout.grad_accum, layout.dtype_bytes
    g = DTYPE_BYTES[layout.reduce_dtype] if layout.reduce_dtype else w   # FSDP MixedPrecision(reduce_dtype)
    block = layer_params_per_rank(spec, layout.tp, "cross" if spec.arch == "encoder_decoder" else "decoder")
    root = n_params - blocks * block
    again = [(block, blocks)] if layout.framework == "fsdp" else [(block, blocks - 1), (root, 1)]
    out = []
    for kind, op, size, parts in (("params, forward", "all_gather", w, [(block, blocks), (root, 1)]),
                                  ("params, again in backward", "all_gather", w, again),
                                  ("grads, every micro-batch", "reduce_scatter", g, [(block, blocks), (root, 1)])):
        out += [Collective("dp", op, n * size, m * calls, "overlap", kind) for n, calls in parts if n > 0 and calls > 0]
    return out


ZERO3_KINDS = {"params, forward": "gather", "params, again in backward": "regather",
               "grads, every micro-batch": "reduce_scatter"}


def zero3_exchange(model: SpecLike, layout: Layout, hw: HardwareProfile, stage: int = 0,
                   bus_efficiency: float = 0.8, cross_node: float = 1.0) -> Dict[str, float]:
    """Seconds per step of ZeRO-3's prefetched traffic on one rank of ``stage``, by kind: the
    forward ``gather``, the backward ``regather`` and the ``reduce_scatter`` (zeros if none), for
    :mod:`megallama.profiling.steptime` to set against the compute of each block. A ring that
    spans nodes runs at ``cross_node`` of its nominal bandwidth
    (:func:`megallama.profiling.efficiency.cross_node_fraction`)."""
    times: Dict[str, float] = {}
    _add_times(times, _dp_collectives(as_spec(model), layout, stage), layout, hw, bus_efficiency, cross_node)
    return zero3_part(times)


def zero3_part(times: Dict[str, float]) -> Dict[str, float]:
    """ZeRO-3's exchange by kind out of :func:`comm_time_by_phase`'s keys (``zero3.gather``, ...)."""
    return {k: times.get(f"zero3.{k}", 0.0) for k in ZERO3_KINDS.values()}


def _add_times(out: Dict[str, float], calls: List[Collective], layout: Layout, hw: HardwareProfile,
               bus_efficiency: float, cross_node: float) -> None:
    """Adds each call's seconds to ``out`` under ``group.phase``, ZeRO-3's prefetched calls under
    ``zero3.<kind>`` (:data:`ZERO3_KINDS`); every link between nodes at ``cross_node`` of its
    nominal bandwidth (a cluster's measured share). A send and the matching receive overlap on a
    full-duplex link: only sends count."""
    shared = dataclasses.replace(hw, inter_node_bandwidth=hw.inter_node_bandwidth * cross_node)
    for c in calls:
        if c.op == "recv":
            continue
        key = f"zero3.{ZERO3_KINDS[c.what]}" if c.phase == "overlap" else f"{c.group}.{c.phase}"
        out[key] = out.get(key, 0.0) + collective_time(c, layout, shared, bus_efficiency)


def collectives(model: SpecLike, layout: Layout, seq: int, stage: int = 0, impl: ActivationImpl = ActivationImpl(),
                scatter_gather=False, reuse_distance: float = Buckets.reuse_distance) -> List[Collective]:
    """Every collective one rank of ``stage`` issues in a step (``scatter_gather``: how stages
    exchange boundary tensors under TP, see :func:`pipe_exchange`: ``False`` whole, ``True``
    Megatron's scatter/gather, ``"deepspeed"`` what megallama's DeepSpeed pipeline does;
    ``reuse_distance``: DeepSpeed's ``stage3_max_reuse_distance``)."""
    spec = as_spec(model)
    return (_tp_collectives(spec, layout, seq, stage, impl) + _pipe_tp_gathers(spec, layout, seq, stage, scatter_gather)
            + _pp_collectives(spec, layout, seq, stage, scatter_gather) + _kv_collectives(spec, layout, stage)
            + ulysses_collectives(spec, layout, seq, stage) + ring_collectives(spec, layout, seq, stage)
            + _dp_collectives(spec, layout, stage, reuse_distance))


def group_size(layout: Layout, group: str) -> int:
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.zero_dp, "embedding": 2, "kv": layout.tp,
            "ulysses": layout.ulysses, "cp": layout.cp}[group]


def members(c: Collective, layout: Layout) -> int:
    return c.members or group_size(layout, c.group)


def wire_bytes(c: Collective, n: int) -> float:
    if c.op in ("send", "recv"):
        return c.payload_bytes
    frac = (n - 1) / n   # all_to_all: each rank keeps its own 1/n
    return c.payload_bytes * (2 * frac if c.op == "all_reduce" else frac)


def collective_bytes_per_step(model: SpecLike, layout: Layout, seq: int, stage: int = 0,
                              impl: ActivationImpl = ActivationImpl(), scatter_gather=False,
                              reuse_distance: float = Buckets.reuse_distance) -> Dict[str, Dict[str, float]]:
    """Per group: ``calls``, ``payload_bytes`` and ring ``wire_bytes`` per step on one rank."""
    out = {g: {"calls": 0.0, "payload_bytes": 0.0, "wire_bytes": 0.0} for g in GROUPS}
    for c in collectives(model, layout, seq, stage, impl, scatter_gather, reuse_distance):
        row = out[c.group]
        row["calls"] += c.calls
        row["payload_bytes"] += c.calls * c.payload_bytes
        row["wire_bytes"] += c.calls * wire_bytes(c, members(c, layout))
    return out


def link(layout: Layout, hw: HardwareProfile, group: str):
    """(bandwidth bytes/s, latency s) of a group's ring, from where its members sit."""
    kind = {"embedding": "pp", "kv": "tp"}.get(group, group)
    if not spans_nodes(layout, kind):
        return hw.intra_node_bandwidth, hw.intra_node_latency_s
    if kind in ("pp", "cp"):   # neighbours on different nodes: one GPU's NIC
        return hw.inter_node_bandwidth, hw.inter_node_latency_s
    per_node = members_per_node(layout, kind)
    return min(hw.intra_node_bandwidth, per_node * hw.inter_node_bandwidth), hw.inter_node_latency_s


def collective_time(c: Collective, layout: Layout, hw: HardwareProfile, bus_efficiency: float = 0.8) -> float:
    """Seconds for all ``c.calls`` calls of one collective."""
    n = members(c, layout)
    if n == 1:
        return 0.0
    if c.op == "all_to_all":
        return all_to_all_time(c, layout, hw, n, bus_efficiency)
    bw, alpha = link(layout, hw, c.group)
    if c.op in ("send", "recv"):
        steps = 1.0
    else:
        ring = (n - 1) * (2 if c.op == "all_reduce" else 1)
        steps = min(ring, 2 * math.ceil(math.log2(n))) if c.op == "all_reduce" else ring  # NCCL: tree AR only
    return c.calls * (alpha * steps + wire_bytes(c, n) / achievable_bandwidth(bw, c.payload_bytes, bus_efficiency,
                                                                               message_half(hw)))


def comm_time_by_phase(model: SpecLike, layout: Layout, seq: int, hw: HardwareProfile, stage: int = 0,
                       bus_efficiency: float = 0.8, impl: ActivationImpl = ActivationImpl(),
                       scatter_gather=False, cross_node: float = 1.0) -> Dict[str, float]:
    """Seconds per step by (group, phase), e.g. ``{"tp.microbatch": ..., "dp.step": ...}``, and
    ZeRO-3's prefetched exchange by kind (``zero3.gather``, ``zero3.regather``,
    ``zero3.reduce_scatter``: :func:`zero3_exchange`'s), in one pass, the links between nodes at
    ``cross_node`` of their nominal bandwidth."""
    out: Dict[str, float] = {}
    _add_times(out, collectives(model, layout, seq, stage, impl, scatter_gather), layout, hw, bus_efficiency,
               cross_node)
    return out
