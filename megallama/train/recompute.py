"""Activation recomputation, set up once for the whole model or for one pipeline stage.

Full mode recomputes every N-th transformer block in backward through DeepSpeed's checkpoint
function (which knows our TP groups and shares our RNG tracker, so dropout replays exactly);
selective mode recomputes only each attention's core (softmax(QK^T)V). A pipeline stage holds
the model's own blocks, so the same walk over blocks serves both paths.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from megallama.config import RunConfig
from megallama.model.blocks import TransformerBlock
from megallama.parallel import ParallelState


def checkpoint_function(cfg: RunConfig, state: ParallelState) -> Optional[Callable]:
    """Configure DeepSpeed's checkpointing with our mpu; its RNG tracker becomes the state's;
    None unless ``train.activation_checkpointing.mode`` is ``full``."""
    import deepspeed

    ac = cfg.train.activation_checkpointing
    if ac.mode != "full":
        return None
    deepspeed.checkpointing.configure(state, partition_activations=ac.partition_activations,
                                      checkpoint_in_cpu=ac.cpu_checkpointing, num_checkpoints=cfg.model.n_layers,
                                      contiguous_checkpointing=False, synchronize=False, profile=False)
    state.rng = deepspeed.checkpointing.get_cuda_rng_tracker()
    return deepspeed.checkpointing.checkpoint


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1,
                                   checkpoint_fn: Optional[Callable] = None) -> None:
    """``full``: recompute every ``every``-th block of ``model`` (a model or a pipeline stage; an
    encoder's blocks come first) with ``checkpoint_fn``; ``selective``: every attention core."""
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for i, block in enumerate(blocks):
        if mode == "full" and i % every == 0:
            block.checkpoint_fn = checkpoint_fn
        if mode == "selective":
            for attn in (block.attention, block.cross_attention):
                if attn is not None:
                    attn.recompute_core = True
