"""Megatron-LM / Megatron-DeepSpeed LLaMA checkpoints (legacy ``mp_rank_XX[_YYY]/model_optim_rng.pt``).

Megatron fuses Q/K/V per query group: each TP shard holds its groups in turn, each as
``[q heads of the group, k, v]``; megallama's ``wqkv`` is ``[all q, all k, all v]``. SwiGLU's
``linear_fc1`` is ``[gate; up]`` per TP shard, the vocabulary is padded to a multiple of
``make_vocab_size_divisible_by * tp`` and pipeline stages number their layers from 0. Both use
RoPE's rotate-half layout, so no rows are permuted within a head. The mapping is written once over
a ``get(stage, tp_rank, name)`` accessor, so weights and Adam moments share it, and lazy tensors
(:mod:`~megallama.checkpoint.streaming`) pass through it: reading streams row blocks out of
memory-mapped files. Files are unpickled weights-only with an explicit allow-list
(:mod:`~megallama.checkpoint.megatron_files`) and written tensor by tensor
(:mod:`~megallama.checkpoint.megatron_write`).
"""
from __future__ import annotations

import math
import re
from argparse import Namespace
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from megallama.checkpoint.streaming import Lazy, Tensorish, cat, materialize
from megallama.config import ConfigError, ModelConfig
from megallama.errors import UserError

Get = Callable[[int, int, str], Tensorish]  # (pipeline stage, TP rank, canonical Megatron name) -> shard
EMB, FINAL, OUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
LAYER = "decoder.layers.{}."
# Older (pre-megatron-core) and Transformer-Engine names -> megatron-core's local-spec names.
_RENAMES: List[Tuple[str, str]] = [
    (r"^language_model\.", ""), (r"^(encoder|transformer)\.", "decoder."),
    (r"\.input_norm\.", ".input_layernorm."), (r"\.self_attention\.query_key_value\.", ".self_attention.linear_qkv."),
    (r"\.self_attention\.dense\.", ".self_attention.linear_proj."),
    (r"\.post_attention_(layer)?norm\.", ".pre_mlp_layernorm."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.linear_fc1."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.linear_fc2."),
    (r"^decoder\.final_norm\.", "decoder.final_layernorm."),
    (r"\.self_attention\.linear_qkv\.layer_norm_weight$", ".input_layernorm.weight"),
    (r"\.mlp\.linear_fc1\.layer_norm_weight$", ".pre_mlp_layernorm.weight"),
]
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
LAYER_PARAMS = ("input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
                "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def canonical(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def layer_of(name: str):
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


# ------------------------------------------------------------------------------- config
def config_from_args(args: Namespace, where: str) -> ModelConfig:
    """A :class:`ModelConfig` from Megatron's saved ``args``; anything LLaMA is not, refused."""
    from megallama.checkpoint.hf import _ffn_fields
    from megallama.checkpoint.safe_read import model_config

    a = vars(args) if isinstance(args, Namespace) else None
    if a is None:
        raise UserError(f"{where}: 'args' is {type(args).__name__}, expected Megatron's argparse.Namespace")

    def need(key, alt=None):
        value = a.get(key, a.get(alt) if alt else None)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}: args.{key} must be a positive integer, got {value!r:.60}")
        return value

    norm = str(a.get("normalization", "")).lower()
    rope = a.get("position_embedding_type") == "rope" or a.get("use_rotary_position_embeddings")
    problems = [(not a.get("swiglu"), "swiglu is not set (LLaMA's MLP is SwiGLU)"),
                (norm != "rmsnorm", f"normalization is {a.get('normalization')!r}, expected 'RMSNorm'"),
                (not rope, f"position_embedding_type is {a.get('position_embedding_type')!r}, expected 'rope'"),
                (a.get("add_bias_linear", False) or a.get("add_qkv_bias", False), "linear biases are on"),
                (a.get("rotary_interleaved", False), "rotary_interleaved is set (megallama rotates halves)"),
                (a.get("rotary_percent", 1.0) != 1.0, f"rotary_percent is {a.get('rotary_percent')}, expected 1.0"),
                (a.get("num_experts"), "a mixture of experts"), (a.get("qk_layernorm", False), "qk_layernorm is set"),
                (a.get("virtual_pipeline_model_parallel_size"), "virtual pipeline stages")]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"{where}: not a LLaMA checkpoint megallama reads: args.{why}")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    groups = need("num_query_groups") if a.get("group_query_attention") else heads
    if a.get("kv_channels") not in (None, dim // heads):
        raise ConfigError(f"{where}: args.kv_channels={a['kv_channels']} differs from hidden_size/num_attention_heads")
    padded = need("padded_vocab_size")
    vocab = a.get("vocab_size") if isinstance(a.get("vocab_size"), int) and 0 < a["vocab_size"] <= padded else padded
    scaling = None
    if a.get("use_rope_scaling"):
        scaling = dict(factor=a.get("rope_scaling_factor", 8.0), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_seq_len=8192)  # megatron-core's fixed Llama 3.1 band
    fields = dict(dim=dim, n_layers=need("num_layers"), n_heads=heads, n_kv_heads=groups, vocab_size=vocab,
                  norm_eps=a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5)),
                  rope_theta=float(a.get("rotary_base", 10000)), rope_scaling=scaling,
                  max_seq_len=a.get("max_position_embeddings") or need("seq_length"),
                  tie_embeddings=not a.get("untie_embeddings_and_output_weights", False),
                  **_ffn_fields(dim, need("ffn_hidden_size")))
    return model_config(fields, where)


def padded_vocab(cfg: ModelConfig, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return math.ceil(cfg.vocab_size / multiple) * multiple


def args_for(cfg: ModelConfig, tp: int, pp: int, iteration: int, consumed: int, dtype: torch.dtype) -> Namespace:
    """The ``args`` Megatron's loader compares with its own (and a reader of this module needs)."""
    s = cfg.rope_scaling
    return Namespace(
        num_layers=cfg.n_layers, hidden_size=cfg.dim, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.n_heads, group_query_attention=cfg.kv_heads != cfg.n_heads,
        num_query_groups=cfg.kv_heads, kv_channels=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
        seq_length=cfg.max_seq_len, vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=128,
        padded_vocab_size=padded_vocab(cfg, tp), swiglu=True, normalization="RMSNorm", norm_epsilon=cfg.norm_eps,
        position_embedding_type="rope", rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer()
        else cfg.rope_theta, rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=s is not None,
        rope_scaling_factor=s.factor if s else 8.0, add_bias_linear=False, add_qkv_bias=False,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings, add_position_embedding=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=False, ckpt_format="torch", iteration=iteration, consumed_train_samples=consumed,
        consumed_valid_samples=0, transformer_impl="local")


# ----------------------------------------------------------------- Megatron -> megallama
def stage_layers(layer_counts: Sequence[int]) -> List[Tuple[int, int]]:
    """``(stage, local index)`` of every global layer, from how many layers each stage holds."""
    return [(s, i) for s, n in enumerate(layer_counts) for i in range(n)]


def to_megallama(get: Get, cfg: ModelConfig, tp: int, layer_counts: Sequence[int]) -> Dict[str, Tensorish]:
    """megallama's TP=1 state dict from Megatron shards (lazy in, lazy out)."""
    last = len(layer_counts) - 1
    vocab = cfg.vocab_size
    out = {"tok_embeddings.weight": _rows(cat([get(0, t, EMB) for t in range(tp)]), 0, vocab),
           "norm.weight": get(last, 0, FINAL)}
    if not cfg.tie_embeddings:
        out["output.weight"] = _rows(cat([get(last, t, OUT) for t in range(tp)]), 0, vocab)
    qh, hd, ng = cfg.n_heads // cfg.kv_heads, cfg.head_dim, cfg.kv_heads // tp
    ffn = cfg.ffn_hidden_size // tp
    for g, (s, i) in enumerate(stage_layers(layer_counts)):
        def shard(t, name, s=s, i=i):
            return get(s, t, LAYER.format(i) + name)
        qkv = [shard(t, "self_attention.linear_qkv.weight") for t in range(tp)]
        per = (qh + 2) * hd  # one group's rows: its q heads, then k, then v
        bounds = {"q": (0, qh * hd), "k": (qh * hd, (qh + 1) * hd), "v": ((qh + 1) * hd, per)}
        pieces = {part: [_rows(q, j * per + a, j * per + b) for q in qkv for j in range(ng)]
                  for part, (a, b) in bounds.items()}
        fc1 = [shard(t, "mlp.linear_fc1.weight") for t in range(tp)]
        me = f"layers.{g}."
        out[me + "attention_norm.weight"] = shard(0, "input_layernorm.weight")
        out[me + "attention.wqkv.weight"] = cat(pieces["q"] + pieces["k"] + pieces["v"])
        out[me + "attention.wo.weight"] = cat_cols([shard(t, "self_attention.linear_proj.weight") for t in range(tp)])
        out[me + "ffn_norm.weight"] = shard(0, "pre_mlp_layernorm.weight")
        out[me + "feed_forward.w13.weight"] = cat([_rows(f, 0, ffn) for f in fc1]  # every rank's gate, then up
                                                  + [_rows(f, ffn, 2 * ffn) for f in fc1])
        out[me + "feed_forward.w2.weight"] = cat_cols([shard(t, "mlp.linear_fc2.weight") for t in range(tp)])
    return out


def _rows(t: Tensorish, a: int, b: int) -> Tensorish:
    return t.rows(a, b) if isinstance(t, Lazy) else t[a:b]


def cat_cols(parts: Sequence[Tensorish]) -> Tensorish:
    """``torch.cat(parts, dim=1)``; lazy if any part is (a row block reads that block of each)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts), dim=1)
    shape = (parts[0].shape[0], sum(p.shape[1] for p in parts))
    return Lazy(shape, parts[0].dtype, lambda a, b: torch.cat([materialize(_rows(p, a, b)) for p in parts], dim=1))


# ----------------------------------------------------------------- megallama -> Megatron
def even_layers(cfg: ModelConfig, pp: int) -> List[int]:
    if cfg.n_layers % pp:
        raise UserError(f"--pp: {cfg.n_layers} layers do not split evenly over {pp} Megatron pipeline stages")
    return [cfg.n_layers // pp] * pp


def check_layout(cfg: ModelConfig, tp: int) -> None:
    for what, n in (("num_attention_heads", cfg.n_heads), ("num_query_groups", cfg.kv_heads),
                    ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if n % tp:
            raise UserError(f"--tp: Megatron splits {what}={n} evenly over TP ranks; {tp} does not divide it")


def from_megallama(state: Dict[str, Tensorish], cfg: ModelConfig, tp: int, layer_counts: Sequence[int],
                   stage: int, rank: int, padded: int = None) -> Dict[str, torch.Tensor]:
    """The Megatron shard (megatron-core local-spec names) of TP rank ``rank`` on ``stage``."""
    return {k: materialize(make()) for k, make in shard_makers(state, cfg, tp, layer_counts, stage, rank,
                                                                 padded).items()}


def shard_makers(state: Dict[str, Tensorish], cfg: ModelConfig, tp: int, layer_counts: Sequence[int],
                 stage: int, rank: int, padded: int = None) -> Dict[str, Callable[[], Tensorish]]:
    """Name -> a function giving that tensor of the shard, lazy where it is a plain row range (so a
    writer holds one block at a time); the vocabulary is padded to ``padded`` rows (default:
    Megatron's multiple of 128 x TP)."""
    last = len(layer_counts) - 1
    out: Dict[str, Callable[[], Tensorish]] = {}
    padded = padded or padded_vocab(cfg, tp)

    def vocab_shard(name):  # only this rank's rows are read; zero rows past the real vocabulary
        per, full = padded // tp, state[name]
        a, b = min(rank * per, full.shape[0]), min((rank + 1) * per, full.shape[0])
        pad = torch.zeros(per - (b - a), full.shape[1], dtype=full.dtype, device=getattr(full, "device", "cpu"))
        return cat([_rows(full, a, b), pad]) if b > a else pad

    def whole(name):
        return lambda: state[name]

    def cols(name):
        return lambda: materialize(state[name]).chunk(tp, 1)[rank].clone()

    def qkv(name):
        q, k, v = materialize(state[name]).split([cfg.n_heads * hd, ng * hd, ng * hd])
        fused = torch.cat([q.view(ng, qh * hd, -1), k.view(ng, hd, -1), v.view(ng, hd, -1)], dim=1).flatten(0, 1)
        return fused.chunk(tp)[rank].clone()

    def fc1(name):
        gate, up = materialize(state[name]).split([cfg.ffn_hidden_size] * 2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])

    if stage == 0:
        out[EMB] = lambda: vocab_shard("tok_embeddings.weight")
    first = sum(layer_counts[:stage])
    qh, hd, ng = cfg.n_heads // cfg.kv_heads, cfg.head_dim, cfg.kv_heads
    for i in range(layer_counts[stage]):
        me, meg = f"layers.{first + i}.", LAYER.format(i)
        out[meg + "input_layernorm.weight"] = whole(me + "attention_norm.weight")
        out[meg + "self_attention.linear_proj.weight"] = cols(me + "attention.wo.weight")
        out[meg + "self_attention.linear_qkv.weight"] = lambda n=me + "attention.wqkv.weight": qkv(n)
        out[meg + "pre_mlp_layernorm.weight"] = whole(me + "ffn_norm.weight")
        out[meg + "mlp.linear_fc1.weight"] = lambda n=me + "feed_forward.w13.weight": fc1(n)
        out[meg + "mlp.linear_fc2.weight"] = cols(me + "feed_forward.w2.weight")
    if stage == last:
        out[FINAL] = whole("norm.weight")
        if not cfg.tie_embeddings:
            out[OUT] = lambda: vocab_shard("output.weight")
        elif last > 0:  # the last stage keeps its own copy of a tied embedding (Megatron syncs them)
            out[OUT] = lambda: vocab_shard("tok_embeddings.weight")
    return out
