"""Autograd functions for the tensor-parallel collectives (Megatron's f/g operators).

Each forward collective has its conjugate in backward, so a layer composes them and gets
correct gradients for free. All are the identity when the TP group has one rank.
Activations are batch-first ``[b, s, h]``; sequence parallelism shards dim 1.
Every function takes the layer's :class:`TPGroup` and keeps it in ``ctx`` for backward, as
Megatron core's mappings take ``group``: nothing here looks the layout up.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.parallel.state import TPGroup

SEQ_DIM = 1


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


def _split(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if x.size(dim) % tp.size:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by tp={tp.size}")
    return x.chunk(tp.size, dim=dim)[tp.rank].contiguous()


def _gather(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if dist.get_backend(tp.group) == "gloo":  # gloo has no reduce-scatter: same result, more bytes
        return _all_reduce(x, tp).chunk(tp.size, dim=dim)[tp.rank].contiguous()
    src = x.movedim(dim, 0).contiguous()
    out = torch.empty((src.size(0) // tp.size,) + tuple(src.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, src, group=tp.group)
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce the gradient (input feeds every TP rank)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce partial sums forward; identity backward."""

    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    """Keep this rank's slice of the last dim; gather gradients back."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _split(x, -1, tp)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1, ctx.tp), None


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the last dim across ranks; split gradients back."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather(x, -1, tp)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.tp), None


class _GatherFromSP(torch.autograd.Function):
    """All-gather sequence shards; backward reduce-scatters (the consumer is TP-split)."""

    @staticmethod
    def forward(ctx, x, tp, reduce_grads: bool = True):
        ctx.tp, ctx.reduce_grads = tp, reduce_grads
        return _gather(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grads:
            return _reduce_scatter(g, SEQ_DIM, ctx.tp), None, None
        return _split(g, SEQ_DIM, ctx.tp), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce partial sums and keep this rank's sequence shard; all-gather gradients back."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _reduce_scatter(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM, ctx.tp), None


class _AllToAll(torch.autograd.Function):
    """Split ``scatter_dim`` into one chunk per rank, send chunk ``i`` to rank ``i``, and concatenate
    what arrives along ``gather_dim``; backward is the same exchange with the two dims swapped."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(g, ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group: TPGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = group.size
    if x.size(scatter_dim) % n:
        raise ValueError(f"dimension {scatter_dim} of size {x.size(scatter_dim)} is not divisible by {n} ranks")
    # chunk i (along scatter_dim) leads, so one flat exchange sends it to rank i
    send = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)
    # recv[i] is rank i's chunk: rank order is position order along gather_dim
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _FromFirstRank(torch.autograd.Function):
    """Broadcast the group's first rank's tensor forward; sum the gradients onto that rank backward
    (the others' copies get none: they are never read)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        x = x.detach().clone(memory_format=torch.contiguous_format)
        dist.broadcast(x, group=tp.group, group_src=0)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.reduce(g, group=ctx.tp.group, group_dst=0)
        return (g if ctx.tp.rank == 0 else torch.zeros_like(g)), None


def all_to_all(x, group: TPGroup, scatter_dim: int, gather_dim: int):
    """DeepSpeed-Ulysses' exchange: e.g. sequence-sharded, all heads -> whole sequence, 1/n of the heads."""
    return x if group.size == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


def copy_to_tp_region(x, tp: TPGroup):
    return _CopyToTP.apply(x, tp)


def reduce_from_tp_region(x, tp: TPGroup):
    return _ReduceFromTP.apply(x, tp)


def scatter_to_tp_region(x, tp: TPGroup):
    return _ScatterToTP.apply(x, tp)


def from_first_rank(x, tp: TPGroup):
    """A weight replicated over ``tp``'s ranks, used as its first rank holds it: one rank owns its
    value and whole gradient, so a gradient norm counting every rank's copy counts it once."""
    return x if tp.size == 1 else _FromFirstRank.apply(x, tp)


def gather_from_tp_region(x, tp: TPGroup):
    return _GatherFromTP.apply(x, tp)


def gather_from_sequence_parallel_region(x, tp: TPGroup, reduce_grads: bool = True):
    """``reduce_grads=False`` when the consumer is replicated (e.g. a gathered final output)."""
    return _GatherFromSP.apply(x, tp, reduce_grads)


def reduce_scatter_to_sequence_parallel_region(x, tp: TPGroup):
    return _ReduceScatterToSP.apply(x, tp)
