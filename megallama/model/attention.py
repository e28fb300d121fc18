"""Multi-head / grouped-query attention on column-parallel Q/K/V and a row-parallel output.

Each TP rank owns ``n_heads/tp`` query heads and ``n_kv_heads/tp`` kv heads, so the attention
core runs locally with no communication; only Wo's partial sums are reduced. With fewer KV heads
than ranks each rank holds a copy of the one KV head its query heads read (the projection layer
keeps the copies equal: ``fused_heads``). Under Ulysses the block's sequence shard is swapped for
a head shard of the whole sequence around the core (:mod:`megallama.parallel.ulysses`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megallama.config import ModelConfig
from megallama.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear
from megallama.parallel import ulysses
from megallama.parallel.random import checkpoint


def kv_for_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                cuda: bool):
    """K/V for ``scaled_dot_product_attention`` and its ``enable_gqa``. On CUDA only the flash and
    math kernels take grouped K/V, and flash takes no mask, so grouped attention with a mask
    (documents, padding) would fall to the math kernel and its fp32 ``s x s`` scores: there K/V
    are expanded to the query heads (query head ``i`` reads KV head ``i // group``, as
    ``enable_gqa`` maps them) and the memory-efficient kernel takes the mask. CPU's flash kernel
    takes both, so nothing is copied there."""
    group = q.size(1) // k.size(1)
    if group > 1 and mask is not None and cuda:
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    return k, v, group > 1


def build_mask(q_len: int, k_len: int, causal: bool, key_padding: Optional[torch.Tensor],
               device, self_attention: bool = True,
               document_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Boolean ``[b|1, 1, q, k]`` mask (True = attend), or None when plain causal suffices.
    ``document_ids [b, s]`` (self-attention over a whole packed sequence): each query sees only
    its own document, so the mask is block-diagonal."""
    if key_padding is None and document_ids is None:
        if not causal or q_len == k_len:
            return None
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(k_len - q_len)
    keep = keep[None, None]
    if document_ids is not None:
        if document_ids.shape[1:] != (q_len,) or q_len != k_len:
            raise ValueError(f"document_ids {tuple(document_ids.shape)} must cover all {q_len} queries and keys")
        keep = keep & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    if key_padding is not None:
        keep = keep & key_padding.bool()[:, None, None, :]
    if key_padding is not None and self_attention:
        # a fully masked row (padding query) would softmax to NaN; let it see itself
        keep = keep | torch.eye(q_len, k_len, dtype=torch.bool, device=device).roll(k_len - q_len, 1)[None, None]
    return keep


class Attention(nn.Module):
    """``state``: the layout it is built for, kept for the per-rank dropout stream (``state.rng``)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, causal: bool = True, cross: bool = False,
                 device=None, dtype=None):
        super().__init__()
        tp = state.tp
        self.parallel_state = state
        self.ulysses = state.ulysses_parallel
        self.causal, self.cross = causal, cross
        self.head_dim = cfg.head_dim
        self.n_local_heads = cfg.n_heads // tp
        self.n_local_kv_heads = max(cfg.kv_heads // tp, 1)
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        kw = dict(init_std=cfg.init_std, device=device, dtype=dtype)
        if cross:
            self.wq = ColumnParallelLinear(state, cfg.dim, [q_out], part_names=["wq"], **kw)
            self.wkv = ColumnParallelLinear(state, cfg.dim, [kv_out, kv_out], part_names=["wk", "wv"],
                                            fused_heads=[cfg.kv_heads] * 2, **kw)
        else:
            self.wqkv = ColumnParallelLinear(state, cfg.dim, [q_out, kv_out, kv_out], part_names=["wq", "wk", "wv"],
                                             fused_heads=[cfg.n_heads, cfg.kv_heads, cfg.kv_heads], **kw)
        n_layers = cfg.n_layers + (cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0)
        self.wo = RowParallelLinear(state, q_out, cfg.dim, init_std=cfg.init_std / math.sqrt(2 * n_layers),
                                    device=device, dtype=dtype)
        self.dropout = cfg.dropout
        self.recompute_core = False  # selective recomputation: rerun softmax(QK^T)V in backward

    def _core(self, q, k, v, mask):
        drop = self.dropout if self.training else 0.0
        k, v, gqa = kv_for_sdpa(q, k, v, mask, q.is_cuda)
        # attention heads are TP-sharded, so their dropout draws from the per-rank stream
        ctx = self.parallel_state.rng.fork() if drop > 0 else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, is_causal=self.causal and mask is None and not self.cross,
                enable_gqa=gqa)

    def forward(self, x: torch.Tensor, rope, mask: Optional[torch.Tensor] = None,
                memory: Optional[torch.Tensor] = None, start_pos: int = 0, kv_cache=None) -> torch.Tensor:
        b = x.size(0)
        hq, hkv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if self.cross:
            q = self.wq(x).view(b, -1, hq, hd)
            if kv_cache is not None and kv_cache.filled:  # the memory's K/V, projected at the first step
                k, v = kv_cache.k, kv_cache.v
            else:
                k, v = self.wkv(memory).view(b, -1, 2 * hkv, hd).split(hkv, dim=2)
                if kv_cache is not None:
                    kv_cache.fill(k, v)
        else:
            # Q and K are adjacent heads of the fused output: one rotation covers both
            qk, v = self.wqkv(x).view(b, -1, hq + 2 * hkv, hd).split([hq + hkv, hkv], dim=2)
            q, k = rope(qk, start_pos).split([hq, hkv], dim=2)
            if kv_cache is not None:
                k, v = kv_cache.update(k, v, start_pos)
            q, k, v = ulysses.to_heads(q, k, v, self.ulysses)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(self.parallel_state.rng, self._core, q, k, v, mask)
        else:
            out = self._core(q, k, v, mask)
        out = ulysses.to_sequence(out.transpose(1, 2), self.ulysses)
        return self.wo(out.reshape(b, -1, hq * hd))
