"""Meta's original LLaMA release: ``params.json`` + ``consolidated.NN.pth``, one file per
model-parallel rank of Meta's own training layout.

``.pth`` files are pickles, so they are read with ``torch.load(weights_only=True)``: tensors and
plain containers only; anything else (a crafted ``__reduce__``) is refused before it runs.
Meta's RoPE pairs adjacent channels; our rotate-half layout needs Wq/Wk rows permuted per head
(the permutation Hugging Face's converter applies).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from megallama.checkpoint.safe_pickle import load_weights_only, refusal_reason
from megallama.config import ConfigError, ModelConfig
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
    """A tensor dict from a ``.pth`` without running any pickled code."""
    try:
        try:
            obj = load_weights_only(path, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = load_weights_only(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: refused: not a plain tensor checkpoint ({refusal_reason(exc)}); it was not "
                        "unpickled because that could run code") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return obj


def _config(params: Dict, vocab_size: int, where: str) -> ModelConfig:
    if params.get("use_scaled_rope"):
        raise ConfigError(f"{where}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    fields = dict(dim=params.get("dim"), n_layers=params.get("n_layers"), n_heads=params.get("n_heads"),
                  n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size,
                  multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                  norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                  max_seq_len=params.get("max_seq_len", 2048))
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(fields[key], int):
            raise ConfigError(f"{where}: missing or non-integer '{key}'")
    try:
        cfg = ModelConfig(**fields)
    except Exception as exc:
        raise ConfigError(f"{where}: unusable params ({str(exc).splitlines()[0]})") from None
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg


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


def load_meta(path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """``(config, TP=1 state dict)`` from a Meta release directory."""
    p = Path(path)
    params_file = p / "params.json"
    try:
        params = json.loads(params_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{params_file}: not found (not a Meta LLaMA checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{params_file}: not valid JSON") from None
    if not isinstance(params, dict):
        raise UserError(f"{params_file}: expected a JSON object")
    files = sorted(p.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{p}: no consolidated.NN.pth files")
    shards = [safe_torch_load(f) for f in files]
    names = [k for k in shards[0] if k not in _IGNORED]
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            raise UserError(f"{f}: holds different tensors than {files[0].name}")
    dim = params.get("dim")
    merged = {n: _merge(n, [s[n] for s in shards], dim, str(p)) for n in names}
    vocab = params.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:  # LLaMA 1 wrote -1: the tokenizer decides
        vocab = merged["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in merged else -1
    cfg = _config(params, vocab, str(params_file))
    return cfg, state_from_meta(merged, cfg, str(p))


def state_from_meta(merged: Dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> Dict[str, torch.Tensor]:
    """Meta names (full tensors) -> megallama's TP=1 state dict, Wq/Wk permuted to rotate-half."""
    from megallama.checkpoint.hf import check_shapes

    src = dict(merged)

    def take(name):
        if name not in src:
            raise UserError(f"{where}: missing tensor '{name}'")
        return src.pop(name)

    out = {k: take(k + ".weight") for k in ("tok_embeddings", "norm", "output")}
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
