"""Optional ``torch.compile`` of the transformer blocks (the run config's ``train.compile``).

Only each block's body (``TransformerBlock._forward``) is compiled, in place: parameter names
and the state dict are unchanged (no ``_orig_mod.`` prefix), the block's ``forward`` still routes
through ``checkpoint_fn`` for activation recomputation, and every block shares one compiled
graph (same code, parameters passed as inputs). Inside the compiled region RoPE and SwiGLU use
their plain formulations, which the compiler fuses (with RMSNorm and the residual adds) into a
few kernels; eager runs keep the hand-written autograd functions.

What pays: on a 2-core CPU with bf16 autocast the fused elementwise work saves roughly a tenth
of a step once compiled; compiling costs tens of seconds at start-up (see
benchmarks/README_speed.md). Not for KV-cache generation (``start_pos`` changes every call).

ZeRO-3 hooks every module it wraps with ``torch.compiler.disable``d functions, and each one met
inside a compiled body breaks the graph there. So a compiled block is marked a ZeRO-3 leaf module
(DeepSpeed then gathers all its parameters in the block's own hooks, around the compiled body, and
hooks none of its sub-modules), and the model's shared rotary table, a hooked module holding no
parameters, is passed into the body as its bound ``forward``: one graph per block, no breaks.
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
            module._forward = _past_hooks(torch.compile(module._forward, mode=mode, dynamic=dynamic))
            module._compiled = True
            module._z3_leaf = True  # deepspeed.utils.set_z3_leaf_module's flag, set without importing DeepSpeed
            count += 1
    log.info("torch.compile: %d transformer blocks", count)
    return count


def _past_hooks(body):
    """``body`` called with a module ``rope`` replaced by its bound ``forward`` (no hooks run)."""
    def run(x, rope, *args):
        return body(x, rope.forward if isinstance(rope, nn.Module) else rope, *args)

    return run


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``model`` with its blocks compiled when ``enabled`` (``train.compile``)."""
    compile_blocks(model, enabled)
    return model
