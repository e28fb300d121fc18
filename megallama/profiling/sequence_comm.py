"""Communication of the sequence-sharding layouts: DeepSpeed-Ulysses' all-to-alls and ring attention.

Per block and micro-batch on one rank (``N = s b`` tokens, ``t`` TP ranks, ``w`` bytes of the
model dtype; a payload is what one rank hands ``torch.distributed``, see :mod:`.comm`):

* ulysses (degree ``u``), as ``megallama.parallel.ulysses`` runs it: forward, one all-to-all of
  the rotated Q, K and V packed together (``N/u x (h/t + 2 kv_t) x w``, ``kv_t`` the K/V width
  per TP rank with KV heads repeated to ``u`` when fewer) and one of the attention output
  (``N/u x h/t x w``); backward the same two, conjugate; a full recompute repeats the forward's.
  Each moves ``(u-1)/u`` of its payload. DeepSpeed's own ``DistributedAttention`` sends Q, K and
  V apart: the same bytes in three calls. The loss adds two scalar all-reduces (sum, count).
* cp (context parallelism, ring attention; the trainer does not run it): each rank's K/V chunk
  (``N/cp x 2 kv_t x w``) travels the ring, ``cp-1`` sends forward; backward passes K/V again and
  their gradients the other way, ``2 (cp-1)`` sends (a full recompute repeats the forward's).
  The sends overlap the block's attention core: only what the ring takes beyond the core's
  compute is exposed (:func:`ring_exposed`). Llama 3 all-gathers K/V instead: the same bytes.

Times: an all-to-all inside a node takes ``(u-1)`` latency steps and its wire bytes over NVLink;
one spanning nodes sends each GPU's off-node share through its own NIC while the on-node share
goes over NVLink, whichever is slower. Ring sends cross one link each: NVLink, or a NIC once the
CP group spans nodes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from megallama.profiling.layout import Layout, members_per_node, spans_nodes

if TYPE_CHECKING:
    from megallama.profiling.comm import Collective
    from megallama.profiling.hardware import HardwareProfile

LOSS_BYTES = 4   # the fp32 loss sum and token count all-reduced over the Ulysses group


def kv_width(spec, tp: int, ulysses: int = 1) -> float:
    """K (or V) elements per token on one TP rank, KV heads repeated to ``ulysses`` when fewer."""
    return max(spec.tp_view(tp).kv_dim / tp, ulysses * spec.head_dim)


def ulysses_collectives(spec, layout: Layout, seq: int, stage: int) -> List["Collective"]:
    from megallama.profiling.comm import Collective

    u = layout.ulysses
    if u == 1:
        return []
    t, w, m = layout.tp, layout.dtype_bytes, layout.grad_accum
    tokens = seq * layout.mbs / u
    blocks = layout.stage_layers(spec)[stage]
    forwards = 2 if layout.recompute == "full" else 1
    qkv = tokens * (spec.dim / t + 2 * kv_width(spec, t, u)) * w
    out = tokens * spec.dim / t * w
    calls = m * blocks * (forwards + 1)   # each forward, and the backward's conjugate exchange
    result = [Collective("ulysses", "all_to_all", qkv, calls, "microbatch", "q, k, v: sequence -> heads"),
              Collective("ulysses", "all_to_all", out, calls, "microbatch", "attention output: heads -> sequence")]
    if stage == layout.pp - 1:
        result.append(Collective("ulysses", "all_reduce", LOSS_BYTES, 2 * m, "microbatch", "loss sum and token count"))
    return result


def ring_collectives(spec, layout: Layout, seq: int, stage: int) -> List["Collective"]:
    from megallama.profiling.comm import Collective

    cp = layout.cp
    if cp == 1:
        return []
    m, blocks = layout.grad_accum, layout.stage_layers(spec)[stage]
    chunk = seq * layout.mbs / cp * 2 * kv_width(spec, layout.tp) * layout.dtype_bytes
    forwards = 2 if layout.recompute == "full" else 1
    steps = m * blocks * (cp - 1) * (forwards + 2)   # K/V forward (x recompute); K/V and dK/dV backward
    return [Collective("cp", "send", chunk, steps, "ring", "K/V chunk (and its gradient) to the next rank"),
            Collective("cp", "recv", chunk, steps, "ring", "K/V chunk (and its gradient) from the previous rank")]


def all_to_all_time(c: "Collective", layout: Layout, hw: "HardwareProfile", n: int, bus_efficiency: float) -> float:
    """Seconds for all ``c.calls`` all-to-alls over a group of ``n`` (module docstring)."""
    steps = n - 1
    if not spans_nodes(layout, c.group):
        return c.calls * (hw.intra_node_latency_s * steps
                          + c.payload_bytes * (n - 1) / n / (hw.intra_node_bandwidth * bus_efficiency))
    local = members_per_node(layout, c.group)
    off = c.payload_bytes * (n - local) / n / (hw.inter_node_bandwidth * bus_efficiency)
    on = c.payload_bytes * (local - 1) / n / (hw.intra_node_bandwidth * bus_efficiency)
    return c.calls * (hw.inter_node_latency_s * steps + max(off, on))


def ring_exposed(ring_s: float, core_s: float) -> float:
    """Ring seconds not hidden behind the attention core they feed (per micro-batch)."""
    return max(0.0, ring_s - core_s)


def attention_core_seconds(spec, layout: Layout, seq: int, hw: "HardwareProfile", gemm: float, stage: int) -> float:
    """One micro-batch's attention-core matmuls on one rank of ``stage`` (forward, backward and a
    recomputed forward): what ring sends can hide behind."""
    from megallama.profiling.flops import forward_terms

    core = forward_terms(spec.tp_view(layout.tp), seq)["attn_core"] / spec.n_layers   # per token, per block
    passes = 3 + (1 if layout.recompute in ("full", "selective") else 0)
    tokens = seq * layout.mbs / layout.seq_shards
    flops = tokens * core * layout.stage_layers(spec)[stage] * passes / layout.tp
    return flops / (hw.peak(layout.dtype) * gemm)


TRAINER_NOTE = "context parallelism (--cp) is costed only: the trainer does not run ring attention"
