"""Rotary position embeddings in the rotate-half layout (the one Hugging Face uses).

Meta's release pairs adjacent channels instead; checkpoint import permutes Wq/Wk rows once so
the hot path needs no complex views or strided copies. Tables are cached per dtype/device.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._cache: Dict[Tuple[torch.dtype, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, device)
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
            pos = torch.arange(self.max_seq_len, dtype=torch.float64)
            freqs = torch.outer(pos, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq, head_dim]
            self._cache[key] = (emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype))
        return self._cache[key]

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape ``[b, s, heads, head_dim]`` for positions start_pos..start_pos+s."""
        seq = x.size(1)
        if start_pos + seq > self.max_seq_len:
            raise ValueError(f"sequence end {start_pos + seq} exceeds max_seq_len={self.max_seq_len}")
        cos, sin = self._tables(x.dtype, x.device)
        cos = cos[start_pos:start_pos + seq].unsqueeze(1)
        sin = sin[start_pos:start_pos + seq].unsqueeze(1)
        half = x.size(-1) // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return torch.addcmul(x * cos, rotated, sin)
