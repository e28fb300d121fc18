"""Activation memory: exactly the tensors autograd saves for backward, per block and per stage.

Derivation, following Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1), then adapted. Units: elements per micro-batch of ``N = s*b``
tokens on one TP rank (``t``); ``h`` hidden, ``a`` heads, ``kd`` the K/V width (GQA; with fewer KV
heads than ranks each rank holds one replicated head, ``kd = t * head_dim``), ``f`` the FFN
width, ``p`` bytes of the compute dtype (2 in the paper). ``r = t`` with sequence parallelism
(SP), else 1: only with SP are the residual stream and the norms sharded along the sequence.

| saved tensor (who saves it)           | GPT, Korthikanti (bytes, p=2, t=1) | LLaMA block here (elements)        |
|---------------------------------------|------------------------------------|------------------------------------|
| attn norm input (norm)                | LayerNorm input 2sbh               | N h / r                            |
| norm statistics, fp32 (norm)          | (ignored)                          | N / r (x4 bytes; LayerNorm 2N/r)   |
| QKV input = norm output (QKV linear)  | 2sbh                               | N h (*)                            |
| Q, K, V (score and PV matmuls)        | Q,K 4sbh + V 2sbh                  | fused QKV output N(h+2kd)/t, kept  |
|                                       |                                    | whole by the V view; q and k after |
|                                       |                                    | RoPE N(h+kd)/t                     |
| softmax output                        | 2as^2b                             | flash: none; eager: N s a / t      |
| attention dropout mask and output     | as^2b + 2as^2b                     | eager with dropout > 0 only        |
| SDPA logsumexp, fp32 (flash kernel)   | -                                  | N a / t (x4 bytes)                 |
| output-projection input (Wo)          | 2sbh                               | N h / t (flash: a view of SDPA's   |
|                                       |                                    | saved output, counted once)        |
| residual dropout mask                 | sbh                                | dropout > 0 only: N h / r (bool)   |
| MLP norm input + statistics           | 2sbh                               | N h / r + N / r (x4)               |
| MLP input (W1/W3, or fc1)             | 2sbh                               | N h (*)                            |
| GeLU input / fused W1|W3 output       | 8sbh                               | 2 N f / t (gate and up are views)  |
| SiLU output (operand of the product)  | -                                  | N f / t (Megatron's fused SwiGLU:  |
|                                       |                                    | none, redone in backward)          |
| W2 input                              | 8sbh                               | N f / t                            |
| MLP residual dropout mask             | sbh                                | dropout > 0 only: N h / r (bool)   |
| total                                 | sbh (34 + 5as/h)                   | see :func:`layer_saved_tensors`    |

(*) ``megallama.parallel.ColumnParallelLinear`` all-gathers its SP input and ``F.linear`` saves the
gathered tensor, so with SP these stay ``N h``; Megatron saves the shard and re-gathers in
backward (``ActivationImpl(sp_saves_gathered_input=False)`` gives ``N h / t``, the paper's 34/t).

With MHA, flash attention, fused norms, no dropout, p=2, t=1 this is ``sbh (2*7 + 2*3 + 2*4f/h)``
(seven h-wide tensors, the 3h-wide QKV output, four f-wide ones) = ``sbh (20 + 8f/h)``, about
``41.3 sbh`` for ``f = 8h/3`` (41.5 for LLaMA-7B's 11008), plus ``(8 + 4a/h) sb`` bytes of fp32
statistics, and no ``s^2`` term. On CPU, torch's composite ``F.rms_norm`` saves the input upcast to fp32 and the
fp32 normalised input instead of the input (``ActivationImpl.for_device("cpu")``). Selective
recomputation keeps the attention core's inputs and drops what it creates (softmax/dropout
tensors, or SDPA's logsumexp; its output is Wo's input and stays). Full recomputation keeps
each block's input (``N h / r``, ``/t`` with DeepSpeed's ``partition_activations``) and
re-creates one block's tensors during its backward (:func:`recompute_working_bytes`). Bytes
are per distinct storage: a saved view keeps its whole base tensor alive and is counted at the
base's size. This list matches, byte for byte, the storages ``saved_tensors_hooks`` sees in
``megallama.model`` on CPU (fp32/bf16, TP 1-2, SP, selective and full recompute; see
tests/test_profiling_activations.py).

With a mask (``data.document_mask``) SDPA saves each block's mask as an additive bias in the
compute dtype (``b s^2``), and on CUDA grouped attention runs on K/V expanded to the query heads
(``2 N h / t``, replacing the fused QKV output V's view kept): :meth:`ActivationImpl.expands_kv`.

Ulysses (degree ``u``, :mod:`megallama.parallel.ulysses`): every tensor above holds ``N/u``
tokens except around the core. RoPE runs at explicit shard positions, so each layer saves the
gathered ``cos, sin`` rows (``N hd / u``). The rotated Q, K and V go through one all-to-all
whose output (``[b, s, (a_t + 2 kv_t)/u, hd]``, KV heads repeated to ``u`` when fewer) SDPA saves
through its three views; the fused QKV output is no longer kept by a V view. SDPA's output and
logsumexp hold ``a_t/u`` heads of the whole sequence, and the second all-to-all makes Wo's input
a separate ``N h / (t u)`` copy. Context parallelism (ring attention, cost model only) is the
plain list at ``N/cp`` tokens per rank: Q, K, V, the output and logsumexp of this rank's chunks.

Op-level selective recomputation (``op``, torchtitan's ``selective_ac_option: op``, costed only)
checkpoints each block and keeps what its policy saves (torchtitan,
``torchtitan/distributed/activation_checkpoint.py``): the outputs of ``aten.mm`` except every
second one per block (:func:`megallama.profiling.flops.op_sac_recomputed`: wk, wo, w3 of
torchtitan's unfused Llama block; wk, wo, fc2 for GPT), SDPA's outputs (output and logsumexp)
and ``reduce_scatter_tensor``'s (the two SP reduce-scatters); the block input stays as the
checkpoint's. A row-parallel matmul's output is the rank's whole-width partial sum.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Literal

from megallama.profiling.arch import ArchSpec, SpecLike, as_spec
from megallama.profiling.flops import block_matmuls, op_sac_recomputed

STAT_BYTES = 4    # norm statistics and logsumexp are fp32
MASK_BYTES = 1    # bool dropout masks
INDEX_BYTES = 8   # int64 token ids / targets


@dataclass(frozen=True)
class ActivationImpl:
    """Which PyTorch implementation of the block the saved-tensor list describes."""

    attention: Literal["flash", "eager"] = "flash"   # SDPA flash kernel vs softmax(QK^T)V
    norm: Literal["fused", "composite"] = "fused"    # fused kernel vs torch's composite rms_norm
    sp_saves_gathered_input: bool = True             # ours; Megatron re-gathers in backward
    softmax_fp32: bool = False                       # eager: Meta upcasts scores before softmax
    fused_qkv_views: bool = True                     # V is a view of the fused QKV output
    partition_activations: bool = False              # DeepSpeed splits checkpointed inputs over TP
    fused_swiglu: bool = False                       # Megatron's SwiGLU saves only gate|up (see _mlp)
    masked: bool = False                             # self-attention takes a mask (packed documents)
    cuda: bool = True                                # SDPA on CUDA (False: on CPU), for expands_kv

    @classmethod
    def named(cls, name: str, device: str = "cuda", masked: bool = False,
              partition_activations: bool = False) -> "ActivationImpl":
        """``--impl``: ``megallama`` (ours on ``device``, with a run's document mask and partitioned
        checkpoints when it sets them) or ``megatron`` (Megatron-LM as Narayanan et al. 2021 ran it:
        eager attention, SP inputs re-gathered in backward, fused SwiGLU)."""
        if name == "megatron":
            return cls(attention="eager", sp_saves_gathered_input=False, fused_swiglu=True)
        return replace(cls.for_device(device, masked), partition_activations=partition_activations)

    @classmethod
    def for_device(cls, device: str, masked: bool = False) -> "ActivationImpl":
        """``megallama.model`` as it runs: on CUDA a fused RMSNorm (apex, or torch's fused
        kernel) saves its input and fp32 rstd; on CPU ``F.rms_norm`` runs composite ops that
        save the input upcast to fp32, the fp32 normalised input and rstd. ``masked``: the
        self-attention takes a mask (``data.document_mask``)."""
        cpu = device == "cpu"
        return cls(norm="composite" if cpu else "fused", masked=masked, cuda=not cpu)

    def expands_kv(self, group: float) -> bool:
        """Whether SDPA gets K/V expanded to the query heads (``group`` of them per KV head), as
        ``megallama.model.attention.kv_for_sdpa`` decides: grouped attention with a mask on CUDA,
        where ``enable_gqa`` would take SDPA's math kernel (tests/test_profiling_masked.py)."""
        return self.attention == "flash" and self.masked and self.cuda and group > 1


@dataclass(frozen=True)
class SavedTensor:
    name: str
    numel: float
    bytes_per_element: int
    saved: bool = True      # False: alive at the peak but not held by autograd (transient)

    @property
    def bytes(self) -> float:
        return self.numel * self.bytes_per_element


def _norm(spec: ArchSpec, prefix: str, n: int, r: int, p: int, impl: ActivationImpl) -> List[SavedTensor]:
    h = spec.dim
    if impl.norm == "composite" and spec.family == "llama":
        return [SavedTensor(f"{prefix}.input (fp32)", n * h / r, STAT_BYTES),
                SavedTensor(f"{prefix}.normalized (fp32)", n * h / r, STAT_BYTES),
                SavedTensor(f"{prefix}.rstd", n / r, STAT_BYTES)]
    stats = 1 if spec.family == "llama" else 2     # rstd; LayerNorm also keeps the mean
    return [SavedTensor(f"{prefix}.input", n * h / r, p), SavedTensor(f"{prefix}.stats", stats * n / r, STAT_BYTES)]


def _attention(spec: ArchSpec, n: int, s_kv: int, t: int, r: int, lin_in: float, p: int, impl: ActivationImpl,
               recompute: str, prefix: str, cross: bool) -> List[SavedTensor]:
    h, kd, a = spec.dim, spec.kv_dim, spec.n_heads
    out = _norm(spec, f"{prefix}_norm", n, r, p, impl)
    out.append(SavedTensor(f"{prefix}.{'q' if cross else 'qkv'}.input", lin_in, p))
    rope = spec.family == "llama" and not cross
    gqa = spec.kv_heads != spec.n_heads
    eager_core = impl.attention == "eager" and recompute != "selective"
    repeat_kv = eager_core and gqa                                # repeated K/V copies replace views
    # selective: the core's checkpoint saves q, k, v as they come, and expands them only inside
    expand = not cross and recompute != "selective" and impl.expands_kv(spec.n_heads / spec.kv_heads)
    if cross:  # q from the decoder; fused K|V from the encoder output (no RoPE in cross-attention)
        out += [SavedTensor(f"{prefix}.q", n * h / t, p), SavedTensor(f"{prefix}.kv (fused)", n * 2 * kd / t, p)]  # source len = seq
    else:
        if repeat_kv or expand or not impl.fused_qkv_views:
            fused = 0.0 if repeat_kv or expand else n * kd / t      # only V if unfused; none if repeated
        else:
            fused = n * (h + 2 * kd) / t                            # V view keeps the whole buffer
        if fused:
            out.append(SavedTensor(f"{prefix}.qkv.output{' (kept by V view)' if impl.fused_qkv_views else ' V'}",
                                   fused, p))
        if rope:
            out.append(SavedTensor(f"{prefix}.q_rope", n * h / t, p))
            if not repeat_kv:
                out.append(SavedTensor(f"{prefix}.k_rope", n * kd / t, p))
        elif not impl.fused_qkv_views:
            out.append(SavedTensor(f"{prefix}.q,k", n * (h + kd) / t, p))
        if repeat_kv:
            out.append(SavedTensor(f"{prefix}.k,v repeated to all heads", 2 * n * h / t, p))
        if expand:   # q's view keeps RoPE's q|k output; the fused QKV output is no longer a view's base
            out.append(SavedTensor(f"{prefix}.k,v expanded to the query heads (CUDA, mask)", 2 * n * h / t, p))
    out += _mask_bias(impl, n * s_kv, p, recompute, prefix, cross)
    if impl.attention == "flash":
        # SDPA returns [b, heads, s, d] strided as [b, s, heads, d]: Wo's input is a view of it
        out.append(SavedTensor(f"{prefix}.sdpa.output = o.input", n * h / t, p))
        if recompute != "selective":
            out.append(SavedTensor(f"{prefix}.sdpa.logsumexp", n * a / t, STAT_BYTES))
    else:
        if recompute != "selective":
            probs = n * s_kv * a / t
            out.append(SavedTensor(f"{prefix}.softmax.output", probs, STAT_BYTES if impl.softmax_fp32 else p))
            if impl.softmax_fp32 and p != STAT_BYTES:
                out.append(SavedTensor(f"{prefix}.probs (cast copy)", probs, p))
            if spec.dropout > 0:
                out += [SavedTensor(f"{prefix}.attn_dropout.mask", probs, MASK_BYTES),
                        SavedTensor(f"{prefix}.attn_dropout.output", probs, p)]
        out.append(SavedTensor(f"{prefix}.o.input", n * h / t, p))   # PV output made contiguous
    if spec.dropout > 0:
        out.append(SavedTensor(f"{prefix}.residual_dropout.mask", n * h / r, MASK_BYTES))
    return out


def _mask_bias(impl: ActivationImpl, elements: float, p: int, recompute: str, prefix: str,
               cross: bool = False) -> List[SavedTensor]:
    """SDPA turns a boolean mask into a new additive bias ``[b, 1, s_q, s_kv]`` in the compute dtype
    in every block and saves it (measured on CPU; CUDA's memory-efficient kernel saves its bias
    too). Selective recomputation's checkpoint saves the one boolean mask instead: not counted."""
    if not impl.masked or cross or impl.attention != "flash" or recompute == "selective":
        return []
    return [SavedTensor(f"{prefix}.sdpa.mask (additive bias)", elements, p)]


def _ulysses_attention(spec: ArchSpec, n: float, seq: int, t: int, r: int, u: int, lin_in: float, p: int,
                       impl: ActivationImpl, recompute: str) -> List[SavedTensor]:
    """Self-attention of one rank of a Ulysses group (module docstring); ``n``: the shard's tokens."""
    h, a, hd = spec.dim, spec.n_heads, spec.head_dim
    kv_t = max(spec.kv_dim / t, u * hd)        # per TP rank, KV heads repeated to u when fewer
    whole = n * u                               # the whole sequence's tokens, around the core
    out = _norm(spec, "attn_norm", n, r, p, impl) + [
        SavedTensor("attn.qkv.input", lin_in, p),
        SavedTensor("attn.rope.cos,sin (at the shard's positions)", n * hd, p),
        SavedTensor("attn.q,k,v (all-to-all output, whole sequence)", whole * (h / t + 2 * kv_t) / u, p)]
    if recompute != "selective" and impl.expands_kv(h / t / kv_t):
        out.append(SavedTensor("attn.k,v expanded to the query heads (CUDA, mask)", 2 * whole * h / (t * u), p))
    out += _mask_bias(impl, whole * seq, p, recompute, "attn")
    if recompute != "selective":
        if impl.attention == "flash":
            out += [SavedTensor("attn.sdpa.output", whole * h / (t * u), p),
                    SavedTensor("attn.sdpa.logsumexp", whole * a / (t * u), STAT_BYTES)]
        else:
            probs = whole * seq * a / (t * u)
            out.append(SavedTensor("attn.softmax.output", probs, STAT_BYTES if impl.softmax_fp32 else p))
            if spec.dropout > 0:
                out += [SavedTensor("attn.attn_dropout.mask", probs, MASK_BYTES),
                        SavedTensor("attn.attn_dropout.output", probs, p)]
            out.append(SavedTensor("attn.pv.output", whole * h / (t * u), p))
    out.append(SavedTensor("attn.o.input (all-to-all output)", n * h / t, p))
    if spec.dropout > 0:
        out.append(SavedTensor("attn.residual_dropout.mask", n * h / r, MASK_BYTES))
    return out


def _op_sac_block(spec: ArchSpec, n: float, t: int, r: int, sp: bool, p: int) -> List[SavedTensor]:
    """What torchtitan's op-level policy keeps of one block (module docstring); ``spec``: the TP view."""
    out = [SavedTensor("block.input (checkpoint)", n * spec.dim / r, p)]
    redone = op_sac_recomputed(spec)
    for mm in block_matmuls(spec):
        if mm not in redone:
            out.append(SavedTensor(f"{mm.name}.output", n * mm.n / (1 if mm.row_parallel else t), p))
    out += [SavedTensor("sdpa.output", n * spec.n_heads * spec.head_dim / t, p),
            SavedTensor("sdpa.logsumexp", n * spec.n_heads / t, STAT_BYTES)]
    if sp and t > 1:
        out.append(SavedTensor("reduce_scatter.outputs (attention, MLP)", 2 * n * spec.dim / t, p))
    return out


def _mlp(spec: ArchSpec, n: int, t: int, r: int, lin_in: float, p: int, impl: ActivationImpl) -> List[SavedTensor]:
    h, f = spec.dim, spec.ffn_hidden
    out = _norm(spec, "mlp_norm", n, r, p, impl) + [SavedTensor("mlp.input", lin_in, p)]
    if spec.glu and impl.fused_swiglu:
        # Megatron-LM megatron/core/fusions/fused_bias_swiglu.py, SwiGLUFunction.forward: saves its
        # input alone and redoes SiLU in backward; fc2 (tensor_parallel/layers.py,
        # LinearWithGradAccumulationAndAsyncCommunication.forward) saves its own input
        out += [SavedTensor("mlp.fc1.output = swiglu.input", 2 * n * f / t, p),
                SavedTensor("mlp.fc2.input", n * f / t, p)]
    elif spec.glu:
        out += [SavedTensor("mlp.w1|w3.output (gate, up)", 2 * n * f / t, p),
                SavedTensor("mlp.silu.output", n * f / t, p), SavedTensor("mlp.w2.input", n * f / t, p)]
    else:
        out += [SavedTensor("mlp.gelu.input", n * f / t, p), SavedTensor("mlp.w2.input", n * f / t, p)]
    if spec.dropout > 0:
        out.append(SavedTensor("mlp.residual_dropout.mask", n * h / r, MASK_BYTES))
    return out


def layer_saved_tensors(model: SpecLike, seq: int, mbs: int, tp: int = 1, sp: bool = False,
                        recompute: str = "none", dtype_bytes: int = 2, impl: ActivationImpl = ActivationImpl(),
                        kind: str = "decoder", ulysses: int = 1, cp: int = 1) -> List[SavedTensor]:
    """The tensors one block keeps for backward, per rank and micro-batch of ``seq`` tokens.

    ``kind``: ``decoder``/``encoder`` (self-attention + MLP) or ``cross`` (decoder block of an
    encoder-decoder model, with a cross-attention sub-layer over a source of length ``seq``).
    ``ulysses``/``cp``: ranks each sequence is split over (decoder blocks only).
    """
    if (ulysses > 1 or cp > 1) and kind == "cross":
        raise ValueError("Ulysses and context parallelism shard decoder-only sequences")
    spec = as_spec(model).tp_view(tp)
    n, t, p = seq * mbs / (ulysses * cp), tp, dtype_bytes   # this rank's tokens
    r = tp if sp else 1
    if recompute == "full":
        split = tp if (sp or impl.partition_activations) else 1
        return [SavedTensor("block.input (checkpoint)", n * spec.dim / split, p)]
    if recompute == "op":
        if ulysses > 1 or kind != "decoder":
            raise ValueError("op-level recomputation is costed for decoder-only blocks without Ulysses")
        return _op_sac_block(spec, n, t, r, sp, p)
    lin_in = n * spec.dim / (t if sp and not impl.sp_saves_gathered_input else 1)
    if ulysses > 1:
        out = _ulysses_attention(spec, n, seq, t, r, ulysses, lin_in, p, impl, recompute)
    else:
        out = _attention(spec, n, seq, t, r, lin_in, p, impl, recompute, "attn", cross=False)
    if kind == "cross":
        out += _attention(spec, n, seq, t, r, lin_in, p, impl, recompute, "cross", cross=True)
        if sp and impl.sp_saves_gathered_input:   # each cross K|V linear saves its own gathered copy
            out.append(SavedTensor("cross.kv.input (gathered encoder output)", n * spec.dim, p))
    return out + _mlp(spec, n, t, r, lin_in, p, impl)


def activation_bytes_per_layer(model: SpecLike, seq: int, mbs: int, tp: int = 1, sp: bool = False,
                               recompute: str = "none", dtype_bytes: int = 2,
                               impl: ActivationImpl = ActivationImpl(), kind: str = "decoder",
                               ulysses: int = 1, cp: int = 1) -> float:
    """Bytes one block saves for backward (sum of :func:`layer_saved_tensors`)."""
    return sum(x.bytes for x in layer_saved_tensors(model, seq, mbs, tp, sp, recompute, dtype_bytes, impl, kind,
                                                    ulysses, cp))


def recomputed_bytes_per_layer(model: SpecLike, seq: int, mbs: int, tp: int = 1, sp: bool = False,
                               recompute: str = "none", dtype_bytes: int = 2, impl: ActivationImpl = ActivationImpl(),
                               kind: str = "decoder", ulysses: int = 1, cp: int = 1) -> float:
    """Bytes of saved tensors one block re-creates in backward: all of them under ``full``, what the
    mode does not keep under ``selective`` and ``op``."""
    if recompute == "none":
        return 0.0
    full = activation_bytes_per_layer(model, seq, mbs, tp, sp, "none", dtype_bytes, impl, kind, ulysses, cp)
    if recompute == "full":
        return full
    kept = activation_bytes_per_layer(model, seq, mbs, tp, sp, recompute, dtype_bytes, impl, kind, ulysses, cp)
    return max(0.0, full - kept)


def recompute_working_bytes(model: SpecLike, seq: int, mbs: int, tp: int = 1, sp: bool = False,
                            recompute: str = "none", dtype_bytes: int = 2, impl: ActivationImpl = ActivationImpl(),
                            kind: str = "decoder", ulysses: int = 1, cp: int = 1) -> float:
    """New bytes alive while one recomputed block runs its backward (one block at a time).

    Selective: what the core re-creates (its dropped tensors) plus a second copy of its output,
    which the recomputed kernel saves for its own backward while the forward's copy stays
    saved as the output projection's input. Full: the block's whole saved set, less the block
    input when the first norm saves that very storage (a fused norm, or an fp32 run where the
    composite norm's upcast is a no-op) and the checkpoint kept it whole (no
    ``partition_activations``). Measured against DeepSpeed runs (tests/test_profiling_measured.py).
    """
    if recompute == "none":
        return 0.0
    spec = as_spec(model)
    n, t, p = seq * mbs / (ulysses * cp), tp, dtype_bytes
    full = activation_bytes_per_layer(spec, seq, mbs, tp, sp, "none", dtype_bytes, impl, kind, ulysses, cp)
    if recompute == "op":   # the block's forward re-run whole: all it would save, less what is kept
        return recomputed_bytes_per_layer(spec, seq, mbs, tp, sp, recompute, dtype_bytes, impl, kind, ulysses, cp)
    if recompute == "selective":
        kept = activation_bytes_per_layer(spec, seq, mbs, tp, sp, recompute, dtype_bytes, impl, kind, ulysses, cp)
        # under Ulysses the output is no longer Wo's input: full - kept already holds its copy
        cores = 0 if ulysses > 1 else (2 if kind == "cross" else 1)
        return full - kept + cores * n * spec.dim / t * p
    shared = (impl.norm == "fused" or p == STAT_BYTES) and not impl.partition_activations
    return full - (n * spec.dim / (tp if sp else 1) * p if shared else 0.0)


def first_stage_saved_tensors(model: SpecLike, seq: int, mbs: int, tp: int = 1, sp: bool = False,
                              dtype_bytes: int = 2, impl: ActivationImpl = ActivationImpl(),
                              ulysses: int = 1) -> List[SavedTensor]:
    """Embedding lookup: token ids (and the out-of-shard mask under TP); GPT adds positions.
    Under Ulysses the ids are a slice of the whole rows: without TP (which masks them into a new
    tensor) the embedding saves that view, keeping the whole ``[b, s]`` alive."""
    spec, n = as_spec(model), seq * mbs / ulysses
    r = tp if sp else 1
    ids = seq * mbs if ulysses > 1 and tp == 1 else n
    out = [SavedTensor("embedding.ids" + (" (source, target)" if spec.arch == "encoder_decoder" else ""),
                       ids * (2 if spec.arch == "encoder_decoder" else 1), INDEX_BYTES)]
    if tp > 1:
        out.append(SavedTensor("embedding.out_of_shard_mask", n, MASK_BYTES))
    if spec.learned_positions:
        out.append(SavedTensor("position_embedding.ids", seq, INDEX_BYTES))
    if spec.dropout > 0:
        out.append(SavedTensor("embedding_dropout.mask", n * spec.dim / r, MASK_BYTES))
    if spec.arch == "encoder_decoder":  # the encoder output, read by every cross-attention K|V linear
        out += _norm(spec, "encoder_final_norm", n, r, dtype_bytes, impl)
        if not (sp and impl.sp_saves_gathered_input):
            out.append(SavedTensor("encoder.output", n * spec.dim / r, dtype_bytes))
    return out


def last_stage_saved_tensors(model: SpecLike, seq: int, mbs: int, tp: int = 1, sp: bool = False,
                             dtype_bytes: int = 2, impl: ActivationImpl = ActivationImpl()) -> List[SavedTensor]:
    """Final norm, LM head input and the vocab-parallel loss.

    ``megallama.parallel.vocab_parallel_cross_entropy`` keeps the fp32 softmax of this rank's
    logit slice plus int64 targets and two bool masks. The ``dtype`` logits themselves are freed
    after the loss forward, and a same-size gradient exists during the head's backward: counted
    once as ``loss.logits (transient)``.
    """
    spec, n, t = as_spec(model), seq * mbs, tp
    r = tp if sp else 1
    lin_in = n * spec.dim / (t if sp and not impl.sp_saves_gathered_input else 1)
    local_v = spec.tp_view(t).vocab_size / t  # a padded vocabulary as TP pads it
    return _norm(spec, "final_norm", n, r, dtype_bytes, impl) + [
        SavedTensor("lm_head.input", lin_in, dtype_bytes),
        SavedTensor("loss.softmax (fp32)", n * local_v, STAT_BYTES),
        SavedTensor("loss.targets + masks", n, INDEX_BYTES + 2 * MASK_BYTES),
        SavedTensor("loss.logits (transient)", n * local_v, dtype_bytes, saved=False)]

