"""Autograd functions for the tensor-parallel collectives (Megatron's f/g operators).

Each forward collective has its conjugate in backward, so a layer composes them and gets
correct gradients for free. All are the identity when the TP group has one rank.
Activations are batch-first ``[b, s, h]``; sequence parallelism shards dim 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.parallel.state import get_state

SEQ_DIM = 1


def _tp():
    s = get_state()
    return s.tp, s.tp_rank, s.tp_group


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    size, _, group = _tp()
    if size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, rank, _ = _tp()
    if size == 1:
        return x
    if x.size(dim) % size:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by tp={size}")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, _, group = _tp()
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, rank, group = _tp()
    if size == 1:
        return x
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: same result, more bytes
        return _all_reduce(x).chunk(size, dim=dim)[rank].contiguous()
    src = x.movedim(dim, 0).contiguous()
    out = torch.empty((src.size(0) // size,) + tuple(src.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, src, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce the gradient (input feeds every TP rank)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce partial sums forward; identity backward."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToTP(torch.autograd.Function):
    """Keep this rank's slice of the last dim; gather gradients back."""

    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1)


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the last dim across ranks; split gradients back."""

    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1)


class _ScatterToSP(torch.autograd.Function):
    """Keep this rank's sequence shard; gather gradients back."""

    @staticmethod
    def forward(ctx, x):
        return _split(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


class _GatherFromSP(torch.autograd.Function):
    """All-gather sequence shards; backward reduce-scatters (the consumer is TP-split)."""

    @staticmethod
    def forward(ctx, x, reduce_grads: bool = True):
        ctx.reduce_grads = reduce_grads
        return _gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grads:
            return _reduce_scatter(g, SEQ_DIM), None
        return _split(g, SEQ_DIM), None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce partial sums and keep this rank's sequence shard; all-gather gradients back."""

    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


def copy_to_tp_region(x):
    return _CopyToTP.apply(x)


def reduce_from_tp_region(x):
    return _ReduceFromTP.apply(x)


def scatter_to_tp_region(x):
    return _ScatterToTP.apply(x)


def gather_from_tp_region(x):
    return _GatherFromTP.apply(x)


def scatter_to_sequence_parallel_region(x):
    return _ScatterToSP.apply(x)


def gather_from_sequence_parallel_region(x, reduce_grads: bool = True):
    """``reduce_grads=False`` when the consumer is replicated (e.g. a gathered final output)."""
    return _GatherFromSP.apply(x, reduce_grads)


def reduce_scatter_to_sequence_parallel_region(x):
    return _ReduceScatterToSP.apply(x)
