"""SwiGLU feed-forward: ``W2(silu(x W1) * (x W3))`` with W1/W3 fused in one column-parallel GEMM."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megallama.config import ModelConfig
from megallama.parallel import ColumnParallelLinear, RowParallelLinear


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        hidden = cfg.ffn_hidden_size
        n_layers = cfg.n_layers + (cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0)
        self.w13 = ColumnParallelLinear(cfg.dim, [hidden, hidden], init_std=cfg.init_std, part_names=["w1", "w3"],
                                        device=device, dtype=dtype)
        self.w2 = RowParallelLinear(hidden, cfg.dim, init_std=cfg.init_std / math.sqrt(2 * n_layers),
                                    device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)
