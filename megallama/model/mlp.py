"""SwiGLU feed-forward: ``W2(silu(x W1) * (x W3))`` with W1/W3 fused in one column-parallel GEMM."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megallama.config import ModelConfig
from megallama.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear


class _SwiGLUProduct(torch.autograd.Function):
    """``silu(gate) * up`` from the fused ``[gate | up]`` output. Saves what autograd would (the
    fused output and ``silu(gate)``) but writes both halves of the gradient straight into one
    ``[gate | up]`` buffer, where autograd would build them apart and concatenate."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        f = gate.size(-1)
        torch.mul(grad, act, out=out[..., f:])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :f])
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    if torch.is_grad_enabled() and gate_up.requires_grad and not torch.compiler.is_compiling():
        return _SwiGLUProduct.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, device=None, dtype=None):
        super().__init__()
        hidden = cfg.ffn_hidden_size
        n_layers = cfg.n_layers + (cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0)
        self.w13 = ColumnParallelLinear(state, cfg.dim, [hidden, hidden], init_std=cfg.init_std,
                                        part_names=["w1", "w3"], device=device, dtype=dtype)
        self.w2 = RowParallelLinear(state, hidden, cfg.dim, init_std=cfg.init_std / math.sqrt(2 * n_layers),
                                    device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))
