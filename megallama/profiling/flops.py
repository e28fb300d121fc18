"""Parameter counts and matmul FLOPs per token, counted the way published runs count them.

Conventions (see DESIGN.md, "Counting FLOPs the way published runs do"):

* Only matmuls count: 2 FLOPs per multiply-add. Norms, softmax, activations, RoPE, the loss are
  left out (they are memory-bound and < 1% of the matmul FLOPs at LLaMA sizes).
* Attention scores ``Q K^T`` and ``P V`` are counted over the full ``s x s`` square even for a
  causal mask, as Megatron-LM counts them (its ``s/6h`` term); a causal kernel skips about half,
  so MFU figures here are comparable with Megatron/PaLM-style MFU, not with causal-exact counts.
* Backward = 2 x forward (a gradient for the input and one for the weight per matmul).
* ``model`` = forward + backward: the MFU numerator. ``hardware`` adds what recomputation redoes:
  ``full`` re-runs every block's forward (not the LM head: it is never checkpointed), giving
  Megatron's ``96 B s l h^2 (1 + s/6h + V/16lh)`` for GPT blocks; ``selective`` re-runs the
  attention core only (``QK^T`` and ``PV``), as Korthikanti et al. 2022 do; ``op`` (torchtitan's
  op-level selective checkpointing, costed only) re-runs every second matmul of each block
  (:func:`block_matmuls`). HFU uses ``hardware``.
* GQA: K and V projections are ``d x (kv_heads*head_dim)``; the score/value matmuls still run
  over all query heads. SwiGLU: three ``d x ffn`` matmuls.
* Encoder-decoder: counted per *target* (decoder) token, with a source of the same length; the
  encoder, the cross-attention K/V projections of the encoder output and cross-attention are
  included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, NamedTuple

from megallama.config.pipeline_split import StageWeights
from megallama.profiling.arch import ArchSpec, SpecLike, as_spec

Recompute = Literal["none", "full", "selective", "op"]
RECOMPUTE_MODES = ("none", "selective", "full")     # what the trainer runs, and the planner searches
COSTED_RECOMPUTE_MODES = RECOMPUTE_MODES + ("op",)  # + torchtitan's op-level SAC, costed when pinned


# ------------------------------------------------------------------------------ parameters
def attention_params(spec: ArchSpec) -> int:
    d, q, kv = spec.dim, spec.n_heads * spec.head_dim, spec.kv_dim
    weights = d * q + 2 * d * kv + q * d
    return weights + ((q + 2 * kv + d) if spec.bias else 0)


def mlp_params(spec: ArchSpec) -> int:
    d, f = spec.dim, spec.ffn_hidden
    n_in = 2 if spec.glu else 1
    weights = (n_in + 1) * d * f
    return weights + ((n_in * f + d) if spec.bias else 0)


def layer_params(spec: ArchSpec, kind: str = "decoder") -> int:
    """One block: ``decoder`` (self-attn + MLP), ``encoder`` (same shapes) or ``cross`` (decoder
    block of an encoder-decoder model: self-attn + cross-attn + MLP, one norm per sub-layer)."""
    n_sub = 3 if kind == "cross" else 2
    attn = attention_params(spec) * (2 if kind == "cross" else 1)
    return attn + mlp_params(spec) + n_sub * spec.norm_params


def parameter_breakdown(model: SpecLike) -> Dict[str, int]:
    """Parameters by part; they sum to :func:`parameter_count`."""
    spec = as_spec(model)
    d, v = spec.dim, spec.vocab_size
    encdec = spec.arch == "encoder_decoder"
    parts = {
        "embedding": v * d,
        "positions": spec.max_seq_len * d if spec.learned_positions else 0,
        "decoder_layers": spec.n_layers * layer_params(spec, "cross" if encdec else "decoder"),
        "encoder_layers": spec.n_encoder_layers * layer_params(spec, "encoder") if encdec else 0,
        "final_norms": spec.norm_params * (2 if encdec else 1),
        "lm_head": 0 if spec.tied_embeddings else v * d,
    }
    if encdec and not spec.shared_enc_dec_embedding:
        parts["embedding"] *= 2
    return parts


def stage_weights(model: SpecLike) -> StageWeights:
    """What :mod:`megallama.config.pipeline_split` balances, from this module's counting: one
    block; the embedding (and learned positions) on the first stage; the final norm and the head
    on the last (a tied head too: across stages the last one keeps its own copy). For our LLaMA
    presets this equals ``ModelConfig.pipeline_weights``, so the cost model splits as training does."""
    spec = as_spec(model)
    parts = parameter_breakdown(spec)
    block = layer_params(spec, "cross" if spec.arch == "encoder_decoder" else "decoder")
    return StageWeights(block=block, first=parts["embedding"] + parts["positions"],
                        last=spec.norm_params + spec.vocab_size * spec.dim)


def parameter_count(model: SpecLike) -> int:
    """Analytic parameter count (LLaMA 7B: 6,738,415,616, the paper's 6.7B)."""
    return sum(parameter_breakdown(model).values())


# ----------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs per (target) token of one training step.

    ``model``: forward + backward, the MFU numerator. ``hardware``: ``model`` plus recomputed
    forward FLOPs, the HFU numerator. ``forward``: one forward pass. ``terms``: forward FLOPs by
    part (summed over layers), for reports and tests.
    """

    forward: float
    model: float
    hardware: float
    recompute: str
    terms: Dict[str, float]

    @property
    def recomputed(self) -> float:
        return self.hardware - self.model


def forward_terms(model: SpecLike, seq_len: int) -> Dict[str, float]:
    """Forward matmul FLOPs per target token by part, summed over layers."""
    spec = as_spec(model)
    d, hd, s = spec.dim, spec.head_dim, seq_len
    q = spec.n_heads * hd
    proj = 2 * d * (q + 2 * spec.kv_dim) + 2 * q * d          # QKV + output projection
    core = 2 * 2 * s * q                                        # QK^T and PV over the full s x s
    mlp = 2 * d * spec.ffn_hidden * (3 if spec.glu else 2)
    terms = {
        "attn_proj": spec.n_layers * proj,
        "attn_core": spec.n_layers * core,
        "mlp": spec.n_layers * mlp,
        "cross_proj": 0.0,
        "cross_core": 0.0,
        "encoder": 0.0,
        "encoder_core": 0.0,
        "lm_head": 2.0 * d * spec.vocab_size,
    }
    if spec.arch == "encoder_decoder":
        # source length == target length, so per-source-token work counts 1:1 per target token
        terms["cross_proj"] = spec.n_layers * proj
        terms["cross_core"] = spec.n_layers * core
        terms["encoder"] = spec.n_encoder_layers * (proj + mlp)
        terms["encoder_core"] = spec.n_encoder_layers * core
    return terms


class Matmul(NamedTuple):
    name: str
    k: int               # input width (the contracted dimension)
    n: int               # output width
    row_parallel: bool   # TP splits k: each rank's output is a whole-width partial sum


def block_matmuls(spec: ArchSpec) -> List[Matmul]:
    """A decoder block's weight matmuls in the order torchtitan's Llama calls them (``wq, wk, wv,
    wo``, then ``w1, w3, w2``; GPT ``fc1, fc2``): the order its op-level SAC counts them in."""
    d, q, kv, f = spec.dim, spec.n_heads * spec.head_dim, spec.kv_dim, spec.ffn_hidden
    mlp = ([Matmul("w1", d, f, False), Matmul("w3", d, f, False), Matmul("w2", f, d, True)] if spec.glu
           else [Matmul("fc1", d, f, False), Matmul("fc2", f, d, True)])
    return [Matmul("wq", d, q, False), Matmul("wk", d, kv, False), Matmul("wv", d, kv, False),
            Matmul("wo", q, d, True)] + mlp


def op_sac_recomputed(spec: ArchSpec) -> List[Matmul]:
    """torchtitan's op SAC saves every matmul output except every second one per block (counting
    from one: the 2nd, 4th, ...), SDPA's outputs and reduce-scatters; these are redone in backward."""
    return block_matmuls(spec)[1::2]


def flops_per_token(model: SpecLike, seq_len: int, recompute: str = "none") -> FlopCount:
    """FLOPs per token for training at ``seq_len`` with the given recomputation mode."""
    if recompute not in COSTED_RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {COSTED_RECOMPUTE_MODES}, got {recompute!r}")
    spec = as_spec(model)
    if recompute == "op" and spec.arch != "decoder":
        raise ValueError("op-level recomputation is costed for decoder-only blocks")
    terms = forward_terms(spec, seq_len)
    forward = sum(terms.values())
    model_flops = 3.0 * forward
    blocks = forward - terms["lm_head"]
    extra = {"none": 0.0, "full": blocks,
             "selective": terms["attn_core"] + terms["cross_core"] + terms["encoder_core"],
             "op": spec.n_layers * sum(2.0 * mm.k * mm.n for mm in op_sac_recomputed(spec))}[recompute]
    return FlopCount(forward=forward, model=model_flops, hardware=model_flops + extra, recompute=recompute,
                     terms=terms)


def megatron_formula_flops_per_token(model: SpecLike, seq_len: int) -> float:
    """Narayanan et al. 2021, eq. (3) per token: ``96 l h^2 (1 + s/6h + V/16lh)`` (GPT, full
    recompute). Kept to check :func:`flops_per_token` against the paper's own arithmetic."""
    spec = as_spec(model)
    l, h, s, v = spec.n_layers, spec.dim, seq_len, spec.vocab_size
    return 96.0 * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


def mfu(tokens_per_s_per_gpu: float, flops: FlopCount, peak_flops: float) -> float:
    """Model FLOPs utilisation: model FLOPs done per second over the GPU's dense peak."""
    return tokens_per_s_per_gpu * flops.model / peak_flops


def hfu(tokens_per_s_per_gpu: float, flops: FlopCount, peak_flops: float) -> float:
    """Hardware FLOPs utilisation: as :func:`mfu` but counting recomputed FLOPs too."""
    return tokens_per_s_per_gpu * flops.hardware / peak_flops
