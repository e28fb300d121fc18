"""RMSNorm: ``x / sqrt(mean(x^2) + eps) * g``, via NVIDIA apex when it imports, else torch."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megallama.parallel import TPGroup, copy_to_tp_region

log = logging.getLogger(__name__)


def _load_apex():
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except Exception:  # ImportError, or a broken build
        return None
    return fused_rms_norm_affine


_APEX_RMS = _load_apex()
_LOGGED = False


def rmsnorm_backend() -> str:
    return "apex" if _APEX_RMS is not None else "torch"


def _log_backend_once() -> None:
    global _LOGGED
    if not _LOGGED:
        log.info("RMSNorm backend: %s", "apex FusedRMSNorm" if _APEX_RMS is not None
                 else "torch.nn.functional.rms_norm (apex not importable)")
        _LOGGED = True


class RMSNorm(nn.Module):
    """``sp_group``: the input is a sequence shard of that TP group, so the weight's gradient is
    partial on each TP rank; routing the weight through copy-to-TP all-reduces it in backward."""

    def __init__(self, dim: int, eps: float = 1e-5, sp_group: Optional[TPGroup] = None,
                 use_apex: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (dim,)
        self.sp_group = sp_group
        self.use_apex = use_apex and _APEX_RMS is not None
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        _log_backend_once()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp_region(self.weight, self.sp_group) if self.sp_group is not None else self.weight
        if self.use_apex and x.is_cuda:
            return _APEX_RMS(x, w, self.normalized_shape, self.eps)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)
