"""Rotary position embeddings in the rotate-half layout (the one Hugging Face uses).

Meta's release pairs adjacent channels instead; checkpoint import permutes Wq/Wk rows once so
the hot path needs no complex views or strided copies. Tables are cached per dtype/device.

In rotate-half form the angle table is ``cat(freqs, freqs)``, so only its first half is kept,
and the rotation ``out = x * cos + rotate_half(x) * sin`` is written half by half straight into
one output (``o1 = x1 c - x2 s``, ``o2 = x2 c + x1 s``): no ``cat``, ``neg`` or sliced copies, and
the backward (the inverse rotation applied to the gradient) saves only the constant tables.
Queries and keys, adjacent in the fused QKV output, are rotated by one call on their joint view.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from megallama.config.schema import RopeScaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x`` rotated by the angles (``-angles`` when ``inverse``) into a new contiguous tensor."""
    half = x.size(-1) // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=1.0 if inverse else -1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=-1.0 if inverse else 1.0)
    return out


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, s, heads, head_dim]`` (any strides) by half-tables ``cos, sin [s, 1, head_dim/2]``."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():  # plain ops: the compiler fuses them into one kernel
        half = x.size(-1) // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ApplyRotary.apply(x, cos, sin)
    return _rotate(x, cos, sin, inverse=False)


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """RoPE's ``head_dim/2`` angular frequencies (float64), with Llama 3.1's scaling when given.

    Llama 3.1 extends its context by band of wavelength ``2*pi/f`` against the original context
    ``L``: wavelengths under ``L/high_freq_factor`` (local detail) are kept, those over
    ``L/low_freq_factor`` are slowed by ``factor``, and the band between blends the two linearly
    in ``L/wavelength``, so the frequency is continuous at both edges.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    ctx = scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > ctx / scaling.low_freq_factor, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < ctx / scaling.high_freq_factor, inv_freq, out)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0,
                 scaling: Optional[RopeScaling] = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self._cache: Dict[Tuple[torch.dtype, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, dtype: torch.dtype, device: torch.device):
        """``cos, sin`` of ``[max_seq, head_dim/2]`` angles (the second half of the full
        rotate-half table repeats the first)."""
        key = (dtype, device)
        if key not in self._cache:
            inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
            freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
            self._cache[key] = (freqs.cos().to(device=device, dtype=dtype), freqs.sin().to(device=device, dtype=dtype))
        return self._cache[key]

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape ``[b, s, heads, head_dim]`` for positions start_pos..start_pos+s;
        returns a new contiguous tensor."""
        seq = x.size(1)
        if start_pos + seq > self.max_seq_len:
            raise ValueError(f"sequence end {start_pos + seq} exceeds max_seq_len={self.max_seq_len}")
        cos, sin = self._tables(x.dtype, x.device)
        return apply_rotary(x, cos[start_pos:start_pos + seq, None], sin[start_pos:start_pos + seq, None])

    def at(self, positions: torch.Tensor) -> "PositionedRotary":
        """This table at explicit per-token ``positions [b, s]`` (packed documents restarting at 0),
        called as the table is; the default path (``start_pos``) stays a slice."""
        return PositionedRotary(self, positions)


class PositionedRotary:
    """``rope(x)`` at given positions: gathered table rows instead of a slice."""

    def __init__(self, rope: RotaryEmbedding, positions: torch.Tensor):
        self.rope, self.positions = rope, positions

    def __call__(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        if start_pos or self.positions.shape != x.shape[:2]:
            raise ValueError(f"positions {tuple(self.positions.shape)} must cover x {tuple(x.shape[:2])} from 0")
        if x.size(1) > self.rope.max_seq_len:  # positions within a sequence stay below its length
            raise ValueError(f"sequence length {x.size(1)} exceeds max_seq_len={self.rope.max_seq_len}")
        cos, sin = self.rope._tables(x.dtype, x.device)
        return apply_rotary(x, cos[self.positions].unsqueeze(2), sin[self.positions].unsqueeze(2))


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's offset from the start of its document in ``document_ids [b, s]`` (ids change
    exactly where a new document starts)."""
    b, s = document_ids.shape
    index = torch.arange(s, device=document_ids.device).expand(b, s)
    starts = torch.zeros_like(index)
    starts[:, 1:] = torch.where(document_ids[:, 1:] != document_ids[:, :-1], index[:, 1:], 0)
    return index - starts.cummax(dim=1).values
