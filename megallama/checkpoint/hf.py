"""Hugging Face Llama checkpoints (``config.json`` + safetensors, one file or sharded) in and out.

HF and megallama share RoPE's rotate-half layout, so weights map by name only: Q/K/V are
concatenated into ``wqkv`` and gate/up into ``w13``; nothing is permuted. Only safetensors are
read (a ``pytorch_model.bin`` is a pickle and is refused), so loading runs no code. The mapping
works on :mod:`~megallama.checkpoint.streaming` lazy tensors as well as plain ones, so
``convert`` streams a checkpoint of any size tensor by tensor (:func:`open_hf`, :func:`save_hf`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from pydantic import ValidationError

from megallama.checkpoint.safe_read import check_fits_memory, check_shipped, read_json
from megallama.checkpoint.streaming import (DEFAULT_SHARD_SIZE, Lazy, Tensorish, cat, equal, materialize, nbytes,
                                            open_safetensors, parse_size, plan_shards, write_safetensors)
from megallama.config import ConfigError, ModelConfig
from megallama.config.schema import RopeScaling
from megallama.config.swiglu import swiglu_base, swiglu_hidden
from megallama.errors import UserError
from megallama.checkpoint.staging import staged_dir

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# megallama's RopeScaling field -> the key in HF's rope_scaling (rope_type "llama3")
_ROPE_KEY = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
             "original_max_seq_len": "original_max_position_embeddings"}
_HF_KEY = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings", "init_std": "initializer_range",
           "multiple_of": "intermediate_size", "ffn_dim_multiplier": "intermediate_size"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer old exports saved; we recompute it
_LAYER = {  # HF name inside model.layers.N -> megallama name inside layers.N (None: fused below)
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}


def is_hf_dir(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and ((p / SINGLE).is_file() or (p / INDEX).is_file())


# --------------------------------------------------------------------------------- config
def _ffn_fields(dim: int, intermediate: int) -> Dict:
    """``multiple_of``/``ffn_dim_multiplier`` whose SwiGLU width (``swiglu_hidden``) is ``intermediate``.

    Meta's own settings are tried first (so llama-7b reads back as multiple_of=256); otherwise
    multiple_of=intermediate with a multiplier that rounds to one multiple reproduces any width.
    """
    candidates = [dict(multiple_of=m, ffn_dim_multiplier=None) for m in (4096, 1024, 256, 128, 64, 32, 16, 8, 1)]
    candidates += [dict(multiple_of=m, ffn_dim_multiplier=f) for f in (1.3, 1.5, 2.0) for m in (4096, 1024, 256)]
    # int(f * int(8d/3)) == intermediate exactly (the +0.5 absorbs float error), one multiple of itself
    candidates.append(dict(multiple_of=intermediate, ffn_dim_multiplier=(intermediate + 0.5) / swiglu_base(dim)))
    for fields in candidates:
        if fields["multiple_of"] > 0 and swiglu_hidden(dim, **fields) == intermediate:
            return fields
    raise ConfigError(f"intermediate_size={intermediate} cannot be expressed with multiple_of/ffn_dim_multiplier "
                      f"for hidden_size={dim}")


def config_from_hf(hf: Dict, where: str = "config.json") -> ModelConfig:
    """A :class:`ModelConfig` from an HF ``LlamaConfig`` dict; unsupported variants are errors."""
    def need(key):
        if key not in hf:
            raise ConfigError(f"{where}: missing '{key}' (not a Llama config)")
        return hf[key]

    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}; only 'llama' checkpoints convert")
    if not isinstance(hf.get("tie_word_embeddings", False), bool):
        raise ConfigError(f"{where}: tie_word_embeddings must be true or false, got {hf['tie_word_embeddings']!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act is {hf['hidden_act']!r}; LLaMA's SwiGLU needs 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{where}: {key} is true; megallama's layers have no biases")
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    for key in required + ("num_key_value_heads", "max_position_embeddings", "head_dim"):
        value = need(key) if key in required else hf.get(key)
        if (value is not None or key in required) and (isinstance(value, bool) or not isinstance(value, int)
                                                       or value <= 0):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    rope_scaling = _rope_scaling_from_hf(hf, where)
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    dim, heads = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim") not in (None, dim // heads):
        raise ConfigError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    fields = dict(dim=dim, n_layers=need("num_hidden_layers"), n_heads=heads,
                  n_kv_heads=hf.get("num_key_value_heads") or heads, vocab_size=need("vocab_size"),
                  norm_eps=hf.get("rms_norm_eps", 1e-6),
                  rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                  max_seq_len=hf.get("max_position_embeddings", 2048), init_std=hf.get("initializer_range", 0.02),
                  rope_scaling=rope_scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                  **_ffn_fields(dim, need("intermediate_size")))
    try:
        cfg = ModelConfig(**fields)
    except ValidationError as exc:  # one line naming the HF key and its value
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        key = _HF_KEY.get(field, field)
        raise ConfigError(f"{where}: {key}: {err['msg'][:1].lower() + err['msg'][1:]} "
                          f"(got {repr(err.get('input'))[:80]})") from None
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg


def _rope_scaling_from_hf(hf: Dict, where: str) -> Optional[RopeScaling]:
    """Llama 3.1's scaling from ``rope_scaling`` (transformers < 5) or ``rope_parameters`` (>= 5);
    any other rope type is refused, and the two keys may not disagree."""
    found = {}
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key) or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{where}: {key} must be an object or null, got {scaling!r:.80}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            continue
        if kind != "llama3":
            raise ConfigError(f"{where}: {key}: rope type {kind!r:.40} is not supported (plain RoPE or 'llama3')")
        for theirs in _ROPE_KEY.values():
            if theirs not in scaling:
                raise ConfigError(f"{where}: {key}.{theirs}: missing (rope_type 'llama3' needs it)")
        try:
            found[key] = RopeScaling(**{ours: scaling[theirs] for ours, theirs in _ROPE_KEY.items()})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = _ROPE_KEY.get(str(err["loc"][0]) if err["loc"] else "", "?")
            raise ConfigError(f"{where}: {key}.{field}: {err['msg'][:1].lower() + err['msg'][1:]} "
                              f"(got {repr(err.get('input'))[:80]})") from None
        except ConfigError as exc:  # the band check names our field
            raise ConfigError(f"{where}: {key}: {exc}") from None
    if len(found) == 2 and found["rope_scaling"] != found["rope_parameters"]:
        raise ConfigError(f"{where}: rope_scaling and rope_parameters describe different RoPE scalings")
    return next(iter(found.values()), None)


def _rope_scaling_to_hf(cfg: ModelConfig) -> Optional[Dict]:
    if cfg.rope_scaling is None:
        return None
    return {"rope_type": cfg.rope_scaling.type,
            **{theirs: getattr(cfg.rope_scaling, ours) for ours, theirs in _ROPE_KEY.items()}}


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> Dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": _rope_scaling_to_hf(cfg), "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": str(dtype).replace("torch.", ""),
        "torch_dtype": str(dtype).replace("torch.", ""),  # the key transformers < 4.56 reads
    }


# -------------------------------------------------------------------------------- weights
State = Mapping[str, Tensorish]


def hf_shapes(cfg: ModelConfig, where: str) -> Dict[str, Tuple[int, ...]]:
    """HF name -> shape of every tensor the config implies (meta tensors: nothing allocated)."""
    from megallama.checkpoint.consolidated import expected_shapes

    meta = {k: torch.empty(v, device="meta") for k, v in expected_shapes(cfg, where).items()}
    shapes = {k: tuple(v.shape) for k, v in state_to_hf(meta, cfg).items()}
    shapes.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (cfg.head_dim // 2,)
                   for i in range(cfg.n_layers)})
    if cfg.tie_embeddings:  # some tied exports still carry the head: accepted when it equals the embedding
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def _hf_tensors(p: Path, cfg: ModelConfig) -> Dict[str, Lazy]:
    """Every shard's header is checked against the config's shapes; no tensor is read yet."""
    if (p / INDEX).is_file():
        weight_map = read_json(p / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{p / INDEX}: no 'weight_map' object of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        bad = next((s for s in shards if not s or Path(s).name != s or s in (".", "..")), None)
        if bad is not None:
            raise UserError(f"{p / INDEX}: shard {bad[:100]!r} is not a file name in {p}")
        for shard in shards:
            if not (p / shard).is_file():
                raise UserError(f"{p / shard}: not found (listed in {INDEX})")
    elif (p / SINGLE).is_file():
        weight_map, shards = None, [SINGLE]
    elif any(p.glob("pytorch_model*.bin")):
        raise UserError(f"{p}: only pickle weights (pytorch_model*.bin) found; they are not loaded because "
                        "unpickling can run code: re-save with save_pretrained(..., safe_serialization=True)")
    else:
        raise UserError(f"{p}: no {SINGLE} or {INDEX}")
    check_shipped(cfg, [p / s for s in shards], str(p))
    expected = hf_shapes(cfg, str(p))
    tensors: Dict[str, Lazy] = {}
    for shard in shards:
        tensors.update(open_safetensors(p / shard, expected=expected))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise UserError(f"{p / INDEX}: '{missing[0]}' is not in the shard it names")
    return tensors


def state_from_hf(tensors: State, cfg: ModelConfig, where: str) -> Dict[str, Tensorish]:
    """HF names -> megallama's TP=1 state dict (fusing Q/K/V and gate/up); lazy in, lazy out."""
    src = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}

    def take(name):
        if name not in src:
            raise UserError(f"{where}: missing tensor '{name}'")
        return src.pop(name)

    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["output.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in src and not equal(src.pop("lm_head.weight"), out["tok_embeddings.weight"]):
        raise UserError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                        "model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        out[me + "attention.wqkv.weight"] = cat([take(hf + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[me + "feed_forward.w13.weight"] = cat([take(hf + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
        for hf_name, me_name in _LAYER.items():
            out[me + me_name] = take(hf + hf_name)
    if src:
        raise UserError(f"{where}: unexpected tensor '{sorted(src)[0]}' (not a plain LlamaForCausalLM)")
    check_shapes(out, cfg, where)
    return out


def state_to_hf(state: State, cfg: ModelConfig) -> Dict[str, Tensorish]:
    """megallama's TP=1 names -> HF's (Q/K/V and gate/up split again); lazy in, lazy out."""
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:  # tied: transformers re-ties lm_head to the embedding on load
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        for x, t in zip("qkv", state[me + "attention.wqkv.weight"].split([q, kv, kv])):
            out[hf + f"self_attn.{x}_proj.weight"] = t
        for x, t in zip(("gate", "up"), state[me + "feed_forward.w13.weight"].split([hidden, hidden])):
            out[hf + f"mlp.{x}_proj.weight"] = t
        for hf_name, me_name in _LAYER.items():
            out[hf + hf_name] = state[me + me_name]
    return {k: v.contiguous() for k, v in out.items()}


def check_shapes(state: State, cfg: ModelConfig, where: str) -> None:
    """Every tensor has the shape the config implies (a mismatch names the tensor)."""
    from megallama.checkpoint.consolidated import expected_shapes

    for name, shape in expected_shapes(cfg, where).items():
        got = tuple(state[name].shape) if name in state else None
        if got != shape:
            raise UserError(f"{where}: tensor '{name}' has shape {got}, expected {shape} from the config")
        if not state[name].is_floating_point():
            raise UserError(f"{where}: tensor '{name}' has dtype {str(state[name].dtype).replace('torch.', '')}, "
                            "expected a floating-point type")


def open_hf(path, fits_memory: bool = False) -> Tuple[ModelConfig, Dict[str, Lazy]]:
    """``(config, lazy TP=1 state dict)`` of an HF Llama directory (safetensors only): every header
    checked, no tensor read. ``convert`` streams it, so only a model loaded whole (:func:`load_hf`,
    ``fits_memory``) must fit this machine's memory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: not a directory")
    if not (p / "config.json").is_file():
        raise UserError(f"{p / 'config.json'}: not found (not a Hugging Face checkpoint)")
    cfg = config_from_hf(read_json(p / "config.json"), str(p / "config.json"))
    if fits_memory:
        check_fits_memory(cfg, str(p / "config.json"))
    return cfg, state_from_hf(_hf_tensors(p, cfg), cfg, str(p))


def load_hf(path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """``(config, TP=1 state dict)`` of an HF Llama directory, read whole into memory."""
    cfg, lazy = open_hf(path, fits_memory=True)
    return cfg, {k: materialize(v) for k, v in lazy.items()}


def save_hf(state: State, cfg: ModelConfig, out_dir, overwrite: bool = False,
            max_shard_bytes: Optional[int] = None, tokenizer: Optional[Path] = None) -> Path:
    """Write an HF Llama directory ``transformers.LlamaForCausalLM.from_pretrained`` reads, sharded
    with an index beyond ``max_shard_bytes`` (default 5GB), tensor by tensor from a lazy or plain
    ``state``; atomic like :func:`save_consolidated` (a temporary directory renamed into place)."""
    if cfg.arch != "decoder":
        raise UserError(f"model arch '{cfg.arch}' has no Hugging Face Llama equivalent (decoder only)")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    tensors = state_to_hf(state, cfg)
    shards = plan_shards(tensors, max_shard_bytes or parse_size(DEFAULT_SHARD_SIZE))
    with staged_dir(out) as tmp:
        dtype = next(iter(tensors.values())).dtype
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
        if len(shards) == 1:
            write_safetensors(tmp / SINGLE, tensors, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, {n: tensors[n] for n in names}, metadata={"format": "pt"})
                weight_map.update({name: fname for name in names})
            total = sum(nbytes(t) for t in tensors.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        if tokenizer is not None:
            from megallama.checkpoint.hf_tokenizer import write_hf_tokenizer

            write_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len)
    return out


def n_params(state: State) -> int:
    return sum(math.prod(t.shape) for t in state.values())
