"""Optional ``torch.compile`` of the transformer blocks (the run config's ``train.compile``).

Only each block's body (``TransformerBlock._forward``) is compiled, in place: parameter names
and the state dict are unchanged (no ``_orig_mod.`` prefix), the block's ``forward`` still routes
through ``checkpoint_fn`` for activation recomputation, and every block shares one compiled
graph (same code, parameters passed as inputs). Inside the compiled region RoPE and SwiGLU use
their plain formulations, which the compiler fuses (with RMSNorm and the residual adds) into a
few kernels; eager runs keep the hand-written autograd functions.

What pays: on a 2-core CPU with bf16 autocast the fused elementwise work saves roughly a tenth
of a step once compiled; compiling costs tens of seconds at start-up (see
benchmarks/README_speed.md). Not for ZeRO-3 (its parameter hooks inside each sub-module do not
trace) nor for KV-cache generation (``start_pos`` changes every call).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, enabled: bool = True, mode: Optional[str] = None,
                   dynamic: Optional[bool] = None) -> int:
    """Compile the body of every :class:`TransformerBlock` under ``model`` (pipeline stages
    included); returns how many blocks were compiled (0 when ``enabled`` is false)."""
    if not enabled:
        return 0
    from megallama.model.blocks import TransformerBlock

    count = 0
    for module in model.modules():
        if isinstance(module, TransformerBlock) and not getattr(module, "_compiled", False):
            module._forward = torch.compile(module._forward, mode=mode, dynamic=dynamic)
            module._compiled = True
            count += 1
    log.info("torch.compile: %d transformer blocks", count)
    return count


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``model`` with its blocks compiled when ``enabled`` (``train.compile``)."""
    compile_blocks(model, enabled)
    return model
