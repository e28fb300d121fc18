"""Bytes per rank: model states under ZeRO 0-3 and offload, activations, the worst pipeline stage.

Model states follow what DeepSpeed (0.19) allocates. With ``P`` the parameters this rank holds
after TP/PP splitting, ``N`` the data-parallel size, ``w`` the model dtype's bytes (2 for
bf16/fp16, 4 for fp32) and ``mixed = w < 4``. Under Ulysses or context parallelism ``N`` counts their ranks too
(``Layout.zero_dp``: DeepSpeed partitions over DP x its sequence-parallel group):

| ZeRO | params  | grads   | optimizer (fp32 master if mixed or ZeRO >= 1, + Adam m, v) |
|------|---------|---------|-------------------------------------------------------------|
| 0    | w P     | w P     | (4 [mixed] + 8) P      (FP16_Optimizer keeps a full master)  |
| 1    | w P     | w P     | (4 + 8) P / N          (stages 1-3 always clone a master,    |
| 2    | w P     | w P / N | (4 + 8) P / N           fp32 runs included)                  |
|      |         | (x2 when accumulating: the running sum is a second partition)        |
| 3    | w P / N | w P / N | (4 + 8) P / N                                               |

bf16 + pipeline at stage 0 runs DeepSpeed's ``BF16_Optimizer``, which shards the optimizer like
stage 1 (``Layout.effective_zero``) but keeps a full-size flat gradient accumulator beside the
bf16 grads (``2 w P``) and reduces them as ZeRO-0 does. ``step_buffers``: the fp32 gradient
copy the optimizer step materialises (``4 P`` at stage 0 mixed, ``4 P / N`` at stages 1-3 in
any precision: ZeRO flattens the partition's gradients into a new tensor for the master),
freed after the step. ``buffers``: at stages 1/2 DeepSpeed's gradient-reduction bucket
(``reduce_bucket_size`` elements, default 5e8; twice with ``overlap_comm``, once more under
the pipeline engine) plus the flattened copy of the bucket being all-reduced (at most a bucket,
at most the rank's parameters; none at DP=1); at stage 0 the flattened all-reduce bucket
(``MEMORY_OPT_ALLREDUCE_SIZE`` elements at most, whatever ``reduce_bucket_size`` says; none at
DP=1 without a pipeline, where megallama skips DeepSpeed's all-reduce with itself); at
stage 3 one bucket plus the parameters gathered at the end of forward: those kept for backward
(:func:`zero3_backward_gather`) and the block in use. These figures were checked storage by
storage against DeepSpeed engines (tests/test_profiling_measured.py). A layout whose stage 3 is
PyTorch FSDP's (``Layout.framework``) is counted as FSDP holds it (:func:`fsdp_state_bytes`).
``offload`` (ZeRO >= 1) moves the optimizer states and the fp32 gradient partition to host
memory (``host``); the device keeps its low-precision parameters and, at stage 1, full grads.
Each pipeline stage holds its own blocks (``Layout.stage_layers``: unequal when ``pp`` does not
divide the layers) and, under 1F1B, ``min(pp - stage, m)`` micro-batches in flight; a run needs
the peak over its stages. A stage's output, once sent, is not counted: nothing saves it for
backward, and Megatron-LM frees the schedule's reference too (``deallocate_output_tensor`` in
megatron/core/pipeline_parallel/schedules.py, on from megatron/training/argument_utils.py). What a GPU needs beyond these tensors (CUDA context, workspaces, NCCL
buffers, fragmentation) and the fit verdict are :mod:`megallama.profiling.overheads`'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megallama.profiling import activations as act
from megallama.profiling.arch import ArchSpec, SpecLike, as_spec
from megallama.profiling.flops import layer_params
from megallama.profiling.layout import DTYPE_BYTES, FP8_WEIGHT_COPY_BYTES, Layout, split as pipeline_split
from megallama.train.ds_settings import Buckets, EngineTraits

ALLREDUCE_BUCKET = int(5e8)   # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (ZeRO-0, BF16_Optimizer)


# ------------------------------------------------------------------------------ parameters
def layer_params_per_rank(spec: ArchSpec, tp: int, kind: str) -> float:
    """One block on one TP rank: split matrices and column biases / tp; norms, row biases whole;
    KV heads replicated when fewer than the ranks (:meth:`ArchSpec.tp_view`)."""
    n_attn = 2 if kind == "cross" else 1
    replicated = (3 if kind == "cross" else 2) * spec.norm_params
    if spec.bias:
        replicated += (n_attn + 1) * spec.dim        # output-projection and W2 biases
    return (layer_params(spec.tp_view(tp), kind) - replicated) / tp + replicated


def _blocks(spec: ArchSpec, pp: int, split: Optional[Sequence[int]]) -> Sequence[int]:
    """Blocks per stage: the given split, else the rule training uses (``Layout.stage_layers``)."""
    return split if split is not None else pipeline_split(spec, pp)


def stage_params(model: SpecLike, tp: int = 1, pp: int = 1, stage: int = 0,
                 split: Optional[Sequence[int]] = None) -> float:
    """Parameters held by one rank of pipeline stage ``stage`` (``split``: blocks per stage)."""
    spec = as_spec(model)
    encdec = spec.arch == "encoder_decoder"
    d, v = spec.dim, spec.tp_view(tp).vocab_size   # a padded vocabulary as TP pads it
    n = _blocks(spec, pp, split)[stage] * layer_params_per_rank(spec, tp, "cross" if encdec else "decoder")
    if stage == 0:
        n += v * d / tp * (2 if encdec and not spec.shared_enc_dec_embedding else 1)
        n += spec.max_seq_len * d if spec.learned_positions else 0
        if encdec:
            n += spec.n_encoder_layers * layer_params_per_rank(spec, tp, "encoder") + spec.norm_params
    if stage == pp - 1:
        n += spec.norm_params
        if not spec.tied_embeddings or pp > 1:   # tied + pipeline: the last stage keeps a copy
            n += v * d / tp
    return n


def params_per_rank(model: SpecLike, tp: int = 1, pp: int = 1, stage: Optional[int] = None,
                    split: Optional[Sequence[int]] = None) -> float:
    """Parameters on one rank of ``stage``, or of the largest stage when ``stage`` is None."""
    spec = as_spec(model)
    counts = _blocks(spec, pp, split)
    stages = range(pp) if stage is None else [stage]
    return max(stage_params(spec, tp, pp, s, counts) for s in stages)


def zero3_backward_gather(model: SpecLike, tp: int = 1, pp: int = 1, stage: int = 0,
                          reuse_distance: float = Buckets.reuse_distance,
                          split: Optional[Sequence[int]] = None) -> float:
    """Parameters (elements, this rank) ZeRO-3 gathers again for backward.

    DeepSpeed keeps a gathered parameter for its backward use when fewer than
    ``stage3_max_reuse_distance`` elements are fetched in between: the parameters after it in
    forward, then the same again in backward, ``2 * after``. So the tail of the model (the
    head, the last blocks) stays gathered; a model smaller than half the distance is never
    re-gathered (counted per block, in forward order).
    """
    spec = as_spec(model)
    encdec = spec.arch == "encoder_decoder"
    parts: List[float] = []
    v = spec.tp_view(tp).vocab_size
    if stage == 0:
        parts.append(v * spec.dim / tp)
        if encdec:
            parts += [layer_params_per_rank(spec, tp, "encoder")] * spec.n_encoder_layers
    parts += [layer_params_per_rank(spec, tp, "cross" if encdec else "decoder")] * _blocks(spec, pp, split)[stage]
    if stage == pp - 1:
        parts.append(spec.norm_params + v * spec.dim / tp)
    after, total = 0.0, 0.0
    for n in reversed(parts):
        if 2 * after >= reuse_distance:
            total += n
        after += n
    return total


# ---------------------------------------------------------------------------- model states
def model_state_bytes(model: SpecLike, tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, dtype: str = "bf16",
                      offload: bool = False, stage: Optional[int] = None, buckets: Buckets = Buckets(),
                      grad_accum: int = 1, split: Optional[Sequence[int]] = None, framework: str = "deepspeed",
                      reduce_dtype: Optional[str] = None) -> Dict[str, float]:
    """Device bytes for params, grads, optimizer states (+ buffers, step_buffers, host); see the
    module docstring for the table. ``stage`` None: the stage holding the most parameters;
    ``buckets``: the run's ZeRO bucket settings (DeepSpeed's defaults when not given);
    ``grad_accum``: micro-batches per step (ZeRO-2 keeps the accumulated partition apart);
    ``split``: blocks per stage (default: the rule training uses); ``framework``/``reduce_dtype``:
    who shards at stage 3 (:func:`fsdp_state_bytes` for PyTorch FSDP) and its reduce dtype."""
    spec = as_spec(model)
    split = _blocks(spec, pp, split)
    traits = EngineTraits.predict(zero, dtype, dp, pp)
    z, w, mixed = traits.effective_zero, DTYPE_BYTES[dtype], dtype != "fp32"
    p = params_per_rank(spec, tp, pp, stage, split)
    n = float(dp)
    if z == 3 and framework != "deepspeed" and not offload:
        st = stage if stage is not None else max(range(pp), key=lambda s: stage_params(spec, tp, pp, s, split))
        return fsdp_state_bytes(spec, tp, p, split[st], n, w, DTYPE_BYTES[reduce_dtype] if reduce_dtype else w)
    master = 4 if (mixed or z >= 1) else 0         # ZeRO 1-3 always clone an fp32 master partition
    params = w * p / (n if z == 3 else 1)
    grads = w * p / (n if z >= 2 else 1)
    if z == 2 and grad_accum > 1:
        grads *= 2                                  # the micro-batch's partition + the accumulated one
    optimizer = (master + 8) * p / (n if z >= 1 else 1)
    step = 4 * p / n if z >= 1 else (4 * p if mixed else 0.0)   # ZeRO copies the partition's grads
    host = 0.0
    if offload:
        host = optimizer + 4 * p / n               # states + the fp32 gradient partition
        optimizer, step = 0.0, 0.0
        if z >= 2:
            grads = 0.0                             # reduced partitions are copied straight to host
    bf16_optimizer = traits.optimizer == "bf16"
    if bf16_optimizer:   # + its full-size flat gradient accumulator (grad_accum_dtype, bf16 by default)
        grads = 2 * w * p
    if z in (1, 2) and not bf16_optimizer:   # bucket(s) + the flattened copy being all-reduced
        copy = min(buckets.reduce, p) * w if n > 1 else 0.0   # nothing to reduce over DP=1
        count = (2 if buckets.overlaps(z) else 1) + (1 if pp > 1 else 0)   # the pipeline engine adds one more
        buffers = buckets.reduce * w * count + copy
    elif z <= 1:   # the engine flattens up to MEMORY_OPT_ALLREDUCE_SIZE gradients per all-reduce,
        # except where megallama skips the all-reduce with itself
        buffers = 0.0 if traits.skips_dp_allreduce else min(p, ALLREDUCE_BUCKET) * w
    else:   # one reduction bucket (per dtype) + the parameters gathered at the end of forward
        st = stage if stage is not None else max(range(pp), key=lambda s: stage_params(spec, tp, pp, s, split))
        kept = p - zero3_backward_gather(spec, tp, pp, st, buckets.reuse_distance, split)
        gathered = min(p, kept + layer_params_per_rank(spec, tp, "decoder"))
        buffers = (buckets.reduce + gathered) * w
    return {"params": params, "grads": grads, "optimizer": optimizer, "buffers": float(buffers),
            "step_buffers": step, "host": host}


def fsdp_state_bytes(spec: ArchSpec, tp: int, p: float, blocks: int, n: float, w: int, g: int) -> Dict[str, float]:
    """PyTorch FSDP ``FULL_SHARD`` with each block wrapped (MPT's Composer, torchtitan): fp32 flat
    parameter shards the optimizer updates in place (no separate master, no step-time copy), their
    fp32 gradient shards and Adam's moments, 16 bytes per parameter over the shards; beside them,
    one block in use and the next prefetched, gathered in the compute dtype ``w``, the root
    (embedding, final norm, head) gathered around the loss, and one block's unsharded gradient in
    the reduce dtype ``g`` on its way to the reduce-scatter."""
    block = layer_params_per_rank(spec, tp, "cross" if spec.arch == "encoder_decoder" else "decoder")
    root = max(0.0, p - blocks * block)
    return {"params": 4 * p / n, "grads": 4 * p / n, "optimizer": 8 * p / n,
            "buffers": (2 * block + root) * w + block * g, "step_buffers": 0.0, "host": 0.0}


# ------------------------------------------------------------------------------ activations
def stage_activation_bytes(model: SpecLike, layout: Layout, seq: int, stage: int = 0,
                           impl: act.ActivationImpl = act.ActivationImpl()) -> Dict[str, float]:
    """Activation bytes on one rank of ``stage`` at its 1F1B peak: ``in_flight`` micro-batches of
    saved tensors, plus one block's recompute working set."""
    spec = as_spec(model)
    t, sp, rc, w, mbs = layout.tp, layout.sp, layout.recompute, layout.dtype_bytes, layout.mbs
    u, cp = layout.ulysses, layout.cp
    kind = "cross" if spec.arch == "encoder_decoder" else "decoder"
    per_layer = act.activation_bytes_per_layer(spec, seq, mbs, t, sp, rc, w, impl, kind, u, cp)
    layers = layout.stage_layers(spec)[stage] * per_layer
    if spec.arch == "encoder_decoder":
        layers += spec.n_encoder_layers * act.activation_bytes_per_layer(spec, seq, mbs, t, sp, rc, w, impl, "encoder")
    if impl.masked and rc in ("selective", "full"):   # the checkpoints hold the one boolean [b, 1, s, s] mask
        layers += mbs * seq * seq * act.MASK_BYTES
    shard = seq // layout.seq_shards   # the embedding and the loss see this rank's tokens only
    first = (sum(x.bytes for x in act.first_stage_saved_tensors(spec, seq // cp, mbs, t, sp, w, impl, u))
             if stage == 0 else 0.0)
    last = (sum(x.bytes for x in act.last_stage_saved_tensors(spec, shard, mbs, t, sp, w, impl))
            if stage == layout.pp - 1 else 0.0)
    k = layout.in_flight(stage)
    return {"blocks": k * layers, "embedding": k * first, "head_and_loss": last,
            "recompute_working": act.recompute_working_bytes(spec, seq, mbs, t, sp, rc, w, impl, kind, u, cp)}


@dataclass
class MemoryBreakdown:
    """Per-rank device bytes of one pipeline stage, by component."""

    stage: int
    components: Dict[str, float] = field(default_factory=dict)
    host_bytes: float = 0.0

    @property
    def activations(self) -> float:
        """Peak activation bytes: the loss's tensors are freed before any block recomputes, so the
        head's share and one block's recompute working set are never alive together."""
        c = {k.split(".", 1)[1]: v for k, v in self.components.items() if k.startswith("activations.")}
        peak_extra = max(c.pop("head_and_loss", 0.0), c.pop("recompute_working", 0.0))
        return sum(c.values()) + peak_extra

    @property
    def total(self) -> float:
        """Peak: the optimizer step's fp32 gradient copy exists only once activations are freed."""
        rest = sum(v for k, v in self.components.items() if not k.startswith("activations.") and k != "step_buffers")
        return rest + max(self.activations, self.components.get("step_buffers", 0.0))


def memory_breakdown(model: SpecLike, layout: Layout, seq: int, stage: Optional[int] = None,
                     impl: act.ActivationImpl = act.ActivationImpl(), buckets: Buckets = Buckets()) -> MemoryBreakdown:
    """Everything on one rank at its peak; ``stage`` None: the stage with the largest total (each
    stage with its own blocks and its own 1F1B micro-batches in flight). ``buckets`` default to
    DeepSpeed's own defaults."""
    spec = as_spec(model)
    if stage is None:
        per_stage = [memory_breakdown(spec, layout, seq, s, impl, buckets) for s in layout.stage_groups(spec)]
        return max(per_stage, key=lambda m: m.total)
    states = model_state_bytes(spec, layout.tp, layout.pp, layout.zero_dp, layout.zero, layout.state_dtype,
                               layout.offload, stage, buckets, layout.grad_accum, layout.stage_layers(spec),
                               layout.framework, layout.reduce_dtype)
    if layout.dtype == "fp8":   # costed only: the blocks' GEMM weights cached in fp8 beside the bf16 ones
        states["fp8_weight_copies"] = (FP8_WEIGHT_COPY_BYTES * layout.stage_layers(spec)[stage]
                                       * layer_params_per_rank(spec, layout.tp, "decoder"))
    acts = stage_activation_bytes(spec, layout, seq, stage, impl)
    host = states.pop("host")
    comps = {**states, **{f"activations.{k}": v for k, v in acts.items()}}
    return MemoryBreakdown(stage=stage, components=comps, host_bytes=host)
