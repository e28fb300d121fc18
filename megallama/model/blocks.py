"""Pre-norm transformer blocks: encoder (bidirectional), decoder (causal), and decoder with
cross-attention, all ``x + f(norm(x))`` over the same parallel attention and SwiGLU."""
from __future__ import annotations

import contextlib
import hashlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megallama.config import ModelConfig
from megallama.model.attention import Attention
from megallama.model.mlp import SwiGLU
from megallama.model.norm import RMSNorm
from megallama.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding


def derive_seed(seed: int, key: str) -> int:
    """A stable per-module seed, so initialisation does not depend on construction order
    (pipeline stages build different subsets of the model)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_module(module: nn.Module, seed: int, key: str) -> None:
    """Initialise every parallel layer and norm under ``module`` from one keyed generator."""
    gen = torch.Generator().manual_seed(derive_seed(seed, key))
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            m.reset_parameters(gen)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
        elif isinstance(m, nn.Linear) and not m.weight.is_meta:
            with torch.no_grad():
                full = torch.empty(m.weight.shape).normal_(0.0, 0.02, generator=gen)
                m.weight.copy_(full)
                if m.bias is not None:
                    m.bias.zero_()


def residual_dropout(x: torch.Tensor, p: float, training: bool, state: ParallelState) -> torch.Tensor:
    """Dropout on the residual stream; shards of a sequence-parallel (or Ulysses) stream draw per rank."""
    if p == 0.0 or not training:
        return x
    ctx = state.rng.fork() if state.sequence_parallel or state.ulysses > 1 else contextlib.nullcontext()
    with ctx:
        return F.dropout(x, p, training=True)


class TransformerBlock(nn.Module):
    """``state``: the layout it is built for, kept for residual dropout under sequence parallelism."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, layer_id: int, causal: bool = True,
                 cross_attention: bool = False, device=None, dtype=None):
        super().__init__()
        sp = state.sp_group
        kw = dict(device=device, dtype=dtype)
        self.parallel_state = state
        self.layer_id = layer_id
        self.dropout = cfg.dropout
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, sp_group=sp, **kw)
        self.attention = Attention(cfg, state, causal=causal, **kw)
        self.cross_attention_norm = self.cross_attention = None
        if cross_attention:
            self.cross_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, sp_group=sp, **kw)
            self.cross_attention = Attention(cfg, state, causal=False, cross=True, **kw)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, sp_group=sp, **kw)
        self.feed_forward = SwiGLU(cfg, state, **kw)
        self.checkpoint_fn = None  # set by a training engine to recompute this block in backward

    def forward(self, x: torch.Tensor, rope, mask: Optional[torch.Tensor] = None,
                memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                start_pos: int = 0, kv_cache=None, cross_cache=None) -> torch.Tensor:
        if self.checkpoint_fn is not None and self.training and torch.is_grad_enabled():
            # only differentiable tensors go through the checkpoint's argument list
            def run(x, *mem):
                return self._forward(x, rope, mask, mem[0] if mem else None, memory_mask, start_pos, kv_cache,
                                     cross_cache)

            return self.checkpoint_fn(run, x) if memory is None else self.checkpoint_fn(run, x, memory)
        return self._forward(x, rope, mask, memory, memory_mask, start_pos, kv_cache, cross_cache)

    def _forward(self, x, rope, mask, memory, memory_mask, start_pos, kv_cache, cross_cache=None) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), rope, mask, start_pos=start_pos, kv_cache=kv_cache)
        x = x + residual_dropout(h, self.dropout, self.training, self.parallel_state)
        if self.cross_attention is not None:
            h = self.cross_attention(self.cross_attention_norm(x), rope, memory_mask, memory=memory,
                                     kv_cache=cross_cache)
            x = x + residual_dropout(h, self.dropout, self.training, self.parallel_state)
        h = self.feed_forward(self.ffn_norm(x))
        return x + residual_dropout(h, self.dropout, self.training, self.parallel_state)
