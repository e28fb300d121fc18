"""Meta's original LLaMA release: ``params.json`` + ``consolidated.NN.pth``, one file per
model-parallel rank of Meta's own training layout.

``.pth`` files are pickles, so they are read with ``torch.load(weights_only=True)``: tensors and
plain containers only; anything else (a crafted ``__reduce__``) is refused before it runs.
Meta's RoPE pairs adjacent channels; our rotate-half layout needs Wq/Wk rows permuted per head
(the permutation Hugging Face's converter applies).

Llama 3.1+ says only ``use_scaled_rope: true``; Meta's code supplies the numbers (factor 8 over an
original 8192-token context for 3.1, 32 for 3.2 1B/3B). They are taken from ``params.json``'s
``rope_scaling_factor`` when present, else from the shipped preset of the same shape
(``llama3.2-1b``...), else Llama 3.1's defaults (:func:`meta_rope_scaling`).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from pydantic import ValidationError

from megallama.checkpoint.safe_pickle import load_weights_only, refusal_reason
from megallama.config import ConfigError, ModelConfig
from megallama.config.schema import RopeScaling, load_preset, preset_names
from megallama.errors import UserError

# Meta's split dimension across its model-parallel files (None: replicated in every file)
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0,
          "attention_norm": None, "ffn_norm": None, "norm": None}
_IGNORED = ("rope.freqs",)  # LLaMA-1 stored its RoPE table; we recompute it


def is_meta_dir(path) -> bool:
    p = Path(path)
    return (p / "params.json").is_file() and any(p.glob("consolidated.*.pth"))


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Wq/Wk from Meta's pairwise RoPE layout to rotate-half (per head)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half`."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def safe_torch_load(path: Path) -> Dict[str, torch.Tensor]:
    """A tensor dict from a ``.pth`` without running any pickled code, memory-mapped so nothing is
    allocated (the legacy pre-zip format, which sizes storages by what the pickle claims, is refused)."""
    try:
        obj = load_weights_only(path, mmap=True)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError, KeyError,
            IndexError, OSError) as exc:
        if "mmap" in str(exc) and "zip" in str(exc).lower():
            raise UserError(f"{path}: legacy (pre-zip) torch format, not loaded: it cannot be checked before its "
                            "storages are allocated; re-save it with a current torch.save") from None
        raise UserError(f"{path}: refused: not a plain tensor checkpoint ({refusal_reason(exc)}); it was not "
                        "unpickled because that could run code") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return obj


def _config(params: Dict, vocab_size: int, where: str, tied: bool = False) -> ModelConfig:
    from megallama.checkpoint.safe_read import check_fits_memory

    fields = dict(dim=params.get("dim"), n_layers=params.get("n_layers"), n_heads=params.get("n_heads"),
                  n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size,
                  multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                  norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                  tie_embeddings=tied)
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool):
            raise ConfigError(f"{where}: missing or non-integer '{key}'")
    preset = _scaled_preset(fields)
    fields["rope_scaling"] = meta_rope_scaling(params, preset, where)
    long_context = preset["max_seq_len"] if preset else _LLAMA31_CONTEXT
    fields["max_seq_len"] = params.get("max_seq_len", long_context if fields["rope_scaling"] else 2048)
    try:
        cfg = ModelConfig(**fields)
    except ValidationError as exc:  # one line naming the key and its value
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        raise ConfigError(f"{where}: {key}: {err['msg'][:1].lower() + err['msg'][1:]} "
                          f"(got {repr(err.get('input'))[:80]})") from None
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check_fits_memory(cfg, where)
    return cfg


_LLAMA31_CONTEXT = 131072  # what Llama 3.1+ models are published with (HF max_position_embeddings)
_SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")


def _scaled_preset(fields: Dict) -> Optional[Dict]:
    """The shipped preset with RoPE scaling whose shape ``fields`` has, if any."""
    for name in preset_names():
        preset = load_preset(name)
        if preset.get("rope_scaling") and all(preset.get(k) == fields.get(k) for k in _SHAPE):
            return preset
    return None


def meta_rope_scaling(params: Dict, preset: Optional[Dict], where: str) -> Optional[RopeScaling]:
    """RoPE scaling of a Meta release: none unless ``use_scaled_rope``; then ``rope_scaling_factor``
    from params.json, else the same-shape preset's scaling, else Llama 3.1's (factor 8)."""
    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise ConfigError(f"{where}: use_scaled_rope must be true or false, got {scaled!r:.40}")
    if not scaled:
        return None
    if "rope_scaling_factor" in params:
        try:
            return RopeScaling(factor=params["rope_scaling_factor"])
        except ValidationError:
            raise ConfigError(f"{where}: rope_scaling_factor must be a positive number, "
                              f"got {params['rope_scaling_factor']!r:.40}") from None
    return RopeScaling(**preset["rope_scaling"]) if preset else RopeScaling()


def meta_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Meta name -> full shape of each tensor the config implies."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    out = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    if cfg.tie_embeddings:
        del out["output.weight"]
    per_layer = {"attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
                 "attention.wo.weight": (d, q), "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d),
                 "feed_forward.w2.weight": (d, f), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    for i in range(cfg.n_layers):
        out.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return out


def _merge(name: str, parts: List[torch.Tensor], dim: int, where: str) -> torch.Tensor:
    kind = name.split(".")[-2]
    if name == "tok_embeddings.weight":
        # LLaMA 1/2 split the embedding's columns (ParallelEmbedding), Llama 3 its rows (vocab)
        split = 1 if parts[0].shape[1] * len(parts) == dim else 0
    elif kind in _SPLIT:
        split = _SPLIT[kind]
    else:
        raise UserError(f"{where}: unexpected tensor '{name}' (not a Meta LLaMA checkpoint)")
    if split is None or len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=split)


def _shard_files(p: Path) -> List[Path]:
    """``consolidated.00.pth`` .. ``NN``, numbered without gaps (a gap names the missing file)."""
    files = sorted(p.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{p}: no consolidated.NN.pth files")
    numbers = []
    for f in files:
        stem = f.name[len("consolidated."):-len(".pth")]
        if not stem.isdigit():
            raise UserError(f"{f}: not a Meta shard name (expected consolidated.NN.pth)")
        numbers.append(int(stem))
    missing = next((i for i in range(max(numbers) + 1) if i not in numbers), None)
    if missing is not None:
        raise UserError(f"{p / f'consolidated.{missing:02d}.pth'}: missing (shards up to "
                        f"consolidated.{max(numbers):02d}.pth are present)")
    return [f for _, f in sorted(zip(numbers, files))]


def load_meta(path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """``(config, TP=1 state dict)`` from a Meta release directory."""
    from megallama.checkpoint.safe_read import check_shipped, read_json

    p = Path(path)
    params_file = p / "params.json"
    if not params_file.is_file():
        raise UserError(f"{params_file}: not found (not a Meta LLaMA checkpoint)")
    params = read_json(params_file)
    files = _shard_files(p)
    shards = [safe_torch_load(f) for f in files]  # memory-mapped: nothing allocated yet
    names = [k for k in shards[0] if k not in _IGNORED]
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            raise UserError(f"{f}: holds different tensors than {files[0].name}")
    dim = params.get("dim")
    wq = shards[0].get("layers.0.attention.wq.weight")
    if isinstance(dim, int) and wq is not None and wq.dim() == 2 and 0 < wq.shape[0] and dim % wq.shape[0] == 0 \
            and dim // wq.shape[0] > len(files):  # Meta splits Wq's rows over its shards
        raise UserError(f"{p / f'consolidated.{len(files):02d}.pth'}: missing (params.json's dim={dim} over "
                        f"{files[0].name}'s {wq.shape[0]} rows of Wq says {dim // wq.shape[0]} shards)")
    vocab = params.get("vocab_size", -1)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:  # LLaMA 1 wrote -1: the tokenizer decides
        emb = shards[0].get("tok_embeddings.weight")
        vocab = emb.shape[0] * (len(files) if emb.dim() == 2 and emb.shape[1] * len(files) != dim else 1) \
            if emb is not None and emb.dim() == 2 else -1
    # params.json has no tie flag: a release without an output layer (Llama 3.2 1B/3B) is tied
    cfg = _config(params, vocab, str(params_file), tied="output.weight" not in names)
    check_shipped(cfg, files, str(p))
    expected = meta_shapes(cfg)
    merged = {}
    for n in names:
        try:
            merged[n] = _merge(n, [s[n] for s in shards], dim, str(p))
        except (RuntimeError, IndexError, ValueError) as exc:
            raise UserError(f"{p}: tensor '{n}' does not merge across the {len(files)} shards "
                            f"({str(exc).splitlines()[0][:120]})") from None
        if n in expected and tuple(merged[n].shape) != expected[n]:
            raise UserError(f"{p}: tensor '{n}' has shape {tuple(merged[n].shape)} over {len(files)} shard(s), "
                            f"expected {expected[n]} from {params_file.name}")
    return cfg, state_from_meta(merged, cfg, str(p))


def state_from_meta(merged: Dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> Dict[str, torch.Tensor]:
    """Meta names (full tensors) -> megallama's TP=1 state dict, Wq/Wk permuted to rotate-half."""
    from megallama.checkpoint.hf import check_shapes

    src = dict(merged)

    def take(name):
        if name not in src:
            raise UserError(f"{where}: missing tensor '{name}'")
        return src.pop(name)

    out = {k: take(k + ".weight") for k in ("tok_embeddings", "norm") + (() if cfg.tie_embeddings else ("output",))}
    out = {k + ".weight": v for k, v in out.items()}
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        wq = interleaved_to_half(take(pre + "attention.wq.weight"), cfg.n_heads)
        wk = interleaved_to_half(take(pre + "attention.wk.weight"), cfg.kv_heads)
        out[pre + "attention.wqkv.weight"] = torch.cat([wq, wk, take(pre + "attention.wv.weight")])
        out[pre + "attention.wo.weight"] = take(pre + "attention.wo.weight")
        out[pre + "feed_forward.w13.weight"] = torch.cat([take(pre + "feed_forward.w1.weight"),
                                                          take(pre + "feed_forward.w3.weight")])
        out[pre + "feed_forward.w2.weight"] = take(pre + "feed_forward.w2.weight")
        out[pre + "attention_norm.weight"] = take(pre + "attention_norm.weight")
        out[pre + "ffn_norm.weight"] = take(pre + "ffn_norm.weight")
    if src:
        raise UserError(f"{where}: unexpected tensor '{sorted(src)[0]}'")
    check_shapes(out, cfg, where)
    return {k: v.contiguous() for k, v in out.items()}
