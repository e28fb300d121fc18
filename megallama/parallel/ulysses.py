"""DeepSpeed-Ulysses sequence parallelism: each rank of the Ulysses group holds ``1/n`` of every
sequence for the whole block and, around the attention core only, ``1/n`` of the heads for the
whole sequence, swapped by one all-to-all in each direction.

The model keeps the layout: it takes whole rows, embeds and predicts only its shard, and every
rank's loss is the whole sequence's token mean (:func:`sequence_mean`), whose gradient reaches
each rank through its own shard. DeepSpeed sums gradients over the Ulysses ranks (its
sequence-parallel convention: ``ParallelState.get_sequence_parallel_group``), which makes them
those of the single-process model.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from megallama.parallel.mappings import all_to_all, gather_from_sequence_parallel_region, reduce_from_tp_region
from megallama.parallel.state import TPGroup

SEQ, HEADS = 1, 2  # of [b, s, heads, head_dim]


def shard(x: torch.Tensor, group: TPGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of a whole-sequence tensor the caller holds on every rank
    (token ids, labels, positions): a slice, no communication."""
    if group.size == 1:
        return x
    n = x.size(dim)
    if n % group.size:
        raise ValueError(f"sequence length {n} is not divisible by ulysses={group.size}")
    step = n // group.size
    return x.narrow(dim, group.rank * step, step)


def positions(tokens: torch.Tensor, group: TPGroup, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """This shard's RoPE positions ``[b, s/n]``: the given per-token positions, or the shard's
    offset into the sequence."""
    if position_ids is None:
        position_ids = torch.arange(tokens.size(1), device=tokens.device).expand(tokens.size(0), -1)
    return shard(position_ids, group)


def to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             group: TPGroup) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[b, s/n, h, d]`` shards -> ``[b, s, h/n, d]``, in one exchange. Rank ``i`` gets query
    heads ``i*h/n..`` and the KV heads they read; KV heads fewer than ``n`` are first repeated to
    ``n`` (a query group then spans ranks, each holding its KV head whole)."""
    n = group.size
    if n == 1:
        return q, k, v
    hq, hkv = q.size(HEADS), k.size(HEADS)
    if hkv < n:
        k, v = (t.repeat_interleave(n // hkv, dim=HEADS) for t in (k, v))
        hkv = n
    # rank i's q, k and v heads side by side in chunk i, so one all-to-all moves all three
    packed = torch.cat([t.unflatten(HEADS, (n, -1)) for t in (q, k, v)], dim=HEADS + 1).flatten(HEADS, HEADS + 1)
    out = all_to_all(packed, group, scatter_dim=HEADS, gather_dim=SEQ)
    return out.split([hq // n, hkv // n, hkv // n], dim=HEADS)


def to_sequence(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """The attention output ``[b, s, h/n, d]`` back to ``[b, s/n, h, d]``."""
    return all_to_all(x, group, scatter_dim=SEQ, gather_dim=HEADS)


def gather_sequence(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Every shard's ``[b, s/n, ...]`` output as the whole ``[b, s, ...]`` (inference logits)."""
    return gather_from_sequence_parallel_region(x, group, reduce_grads=False)


def sequence_mean(loss_sum: torch.Tensor, count: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """The whole sequence's mean from each shard's sum and label count: the value on every rank,
    the gradient (``1/total``) through this rank's shard only."""
    if group.size == 1:
        return loss_sum / count.clamp(min=1)
    total = reduce_from_tp_region(count.detach().to(loss_sum.dtype), group)
    return reduce_from_tp_region(loss_sum, group) / total.clamp(min=1)
