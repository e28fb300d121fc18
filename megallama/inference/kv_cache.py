"""Per-layer key/value caches for incremental decoding.

Each attention layer stores the rotated keys and the values of every position already seen, so
a decoding step runs the model on one new token per sequence instead of the whole prefix. The
cache holds this TP rank's kv heads only (heads are split across ranks, caches with them).
An encoder-decoder's cross-attention attends to a fixed encoder memory, so its K/V are
projected once, at the first decoding step, and reused (:class:`CrossKVCache`).
"""
from __future__ import annotations

from typing import List, Tuple

import torch


class KVCache:
    """Preallocated ``[batch, max_len, local_kv_heads, head_dim]`` buffers for one layer."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=torch.float32, device=None):
        shape = (batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``[b, s, heads, head_dim]``) at positions start_pos..start_pos+s and
        return the keys/values of positions 0..start_pos+s."""
        b, s = k.shape[:2]
        end = start_pos + s
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[:b, start_pos:end] = k
        self.v[:b, start_pos:end] = v
        return self.k[:b, :end], self.v[:b, :end]


class CrossKVCache:
    """One decoder layer's cross-attention K/V ``[batch, src_len, local_kv_heads, head_dim]``."""

    def __init__(self):
        self.k = self.v = None

    @property
    def filled(self) -> bool:
        return self.k is not None

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v


def make_cross_caches(model: torch.nn.Module) -> List[CrossKVCache]:
    """One empty cross-attention cache per decoder layer of an encoder-decoder."""
    return [CrossKVCache() for _ in model.layers]


def make_kv_caches(model: torch.nn.Module, batch: int, max_len: int) -> List[KVCache]:
    """One cache per decoder layer of ``model``, sized for this rank's heads, dtype and device."""
    caches = []
    for layer in model.layers:
        attn = layer.attention
        w = attn.wqkv.weight
        caches.append(KVCache(batch, max_len, attn.n_local_kv_heads, attn.head_dim, w.dtype, w.device))
    return caches
