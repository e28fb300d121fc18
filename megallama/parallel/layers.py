"""Column-, row- and vocab-parallel layers.

Each rank holds a slice of one logical weight. Initialisation draws the *full* master weight
from a generator and keeps this rank's slice, so a seed gives the same model at any TP degree.
Split parameters carry ``tensor_model_parallel``, ``tp_split_dim``, ``tp_fused_sizes`` (plus
``tp_fused_heads`` for blocks of heads and ``tp_pad_multiple`` for a padded vocabulary) so
DeepSpeed counts them once per TP group and checkpoint tools can reassemble them. A vocabulary
padded for TP (``padded_vocab``) holds zero rows past the real vocabulary on the last rank(s);
the full (logical) weight never includes them.
Each layer is given the :class:`ParallelState` it is built for and keeps its :class:`TPGroup`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megallama.config.layout_rules import kv_replicas, padded_vocab, tp_shard
from megallama.parallel import mappings
from megallama.parallel.state import ParallelState, TPGroup


def _mark(param: nn.Parameter, split_dim: int, fused_sizes: Sequence[int], *,
          fused_heads: Optional[Sequence[int]] = None, pad_multiple: Optional[int] = None) -> None:
    param.tensor_model_parallel = True
    param.tp_split_dim = split_dim
    param.tp_fused_sizes = tuple(fused_sizes)
    param.tp_pad_multiple = pad_multiple
    if fused_heads is not None:  # blocks of heads: fewer heads than ranks are replicated, not split
        param.tp_fused_heads = tuple(fused_heads)


def tp_pieces(fused_sizes: Sequence[int], fused_heads: Optional[Sequence[int]], tp: int) -> List[Tuple[int, int]]:
    """``(rows of one rank's piece, ranks holding each piece)`` per fused block: a block of fewer
    heads than ranks is cut per head, each head held by ``tp / heads`` consecutive ranks."""
    reps = [kv_replicas(h, tp) for h in fused_heads] if fused_heads else [1] * len(fused_sizes)
    return [(tp_shard(n, tp // rep, "fused block"), rep) for n, rep in zip(fused_sizes, reps)]


def _padding(full: torch.Tensor, split_dim: int, rows: int) -> List[int]:
    pad = [0] * (2 * full.dim())
    pad[2 * (full.dim() - 1 - split_dim) + 1] = rows
    return pad


def split_for_rank(full: torch.Tensor, split_dim: int, fused_sizes: Sequence[int], tp: int, rank: int, *,
                   fused_heads: Optional[Sequence[int]] = None, owned: bool = False,
                   pad_multiple: Optional[int] = None) -> torch.Tensor:
    """The shard ``rank`` of ``tp`` holds of a full (logical) weight; ``owned``: without the blocks
    whose piece another rank holds first (the layout-free form stores each replicated head once);
    a padded vocabulary (one logical block) gets its zero rows first."""
    if pad_multiple:
        (n,) = fused_sizes
        return F.pad(full, _padding(full, split_dim, padded_vocab(n, tp, pad_multiple) - n)).chunk(tp, split_dim)[rank]
    parts = torch.split(full, list(fused_sizes), dim=split_dim)
    keep = [p.narrow(split_dim, (rank // rep) * piece, piece)
            for p, (piece, rep) in zip(parts, tp_pieces(fused_sizes, fused_heads, tp)) if not (owned and rank % rep)]
    return torch.cat(keep, dim=split_dim) if keep else full.narrow(split_dim, 0, 0)


def merge_tp_shards(shards: Sequence[torch.Tensor], split_dim: int, fused_sizes: Sequence[int], *,
                    fused_heads: Optional[Sequence[int]] = None, owned: bool = False,
                    pad_multiple: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`split_for_rank`: rebuild the full weight from every rank's shard (of a
    replicated block, the copy of the first rank holding each piece; of a padded vocabulary,
    without the padding)."""
    if pad_multiple:
        return torch.cat(list(shards), dim=split_dim).narrow(split_dim, 0, fused_sizes[0])
    tp = len(shards)
    pieces = tp_pieces(fused_sizes, fused_heads, tp)
    per_rank = []
    for r, shard in enumerate(shards):
        held = [i for i, (_, rep) in enumerate(pieces) if not (owned and r % rep)]
        per_rank.append(dict(zip(held, torch.split(shard, [pieces[i][0] for i in held], dim=split_dim))))
    blocks = [torch.cat([per_rank[r][i] for r in range(0, tp, rep)], dim=split_dim)
              for i, (_, rep) in enumerate(pieces)]
    return torch.cat(blocks, dim=split_dim)


def _split_marks(param: nn.Parameter) -> Dict:
    return dict(fused_heads=getattr(param, "tp_fused_heads", None),
                pad_multiple=getattr(param, "tp_pad_multiple", None))


def param_shard(full: torch.Tensor, param: nn.Parameter, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of ``param``'s full tensor, as its layer holds it (the tensor itself when
    TP replicates the parameter and no vocabulary padding applies)."""
    marks = _split_marks(param)
    if not getattr(param, "tensor_model_parallel", False) or (tp == 1 and not marks["pad_multiple"]):
        return full
    return split_for_rank(full, param.tp_split_dim, param.tp_fused_sizes, tp, rank, **marks)


def logical_shape(param: nn.Parameter) -> tuple:
    """The full weight's shape at TP=1 without vocabulary padding (what checkpoints hold)."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.tp_split_dim] = sum(param.tp_fused_sizes)
    return tuple(shape)


def gather_tp_tensor(local: torch.Tensor, param: nn.Parameter, tp: TPGroup) -> torch.Tensor:
    """All-gather a TP-split tensor (a weight or its gradient) back to its full logical shape."""
    marks = _split_marks(param)
    if not getattr(param, "tensor_model_parallel", False) or (tp.size == 1 and not marks["pad_multiple"]):
        return local
    parts = [local]
    if tp.size > 1:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(tp.size)]
        dist.all_gather(parts, local.contiguous(), group=tp.group)
    return merge_tp_shards(parts, param.tp_split_dim, param.tp_fused_sizes, **marks)


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """This rank's vocab slice of the logits with padded columns at the lowest finite value: no
    probability in the loss (exactly the unpadded model's) and no gradient to the padded rows.
    (Finite, not -inf: the vocab-parallel loss multiplies a non-owned target's logit by zero.)"""
    local = logits.size(-1)
    real = min(max(vocab_size - tp.rank * local, 0), local)
    if real == local:
        return logits
    padded = torch.arange(local, device=logits.device) >= real
    return logits.masked_fill(padded, torch.finfo(logits.dtype).min)


class _ParallelLinearBase(nn.Module):
    split_dim = 0

    def __init__(self, state: ParallelState, sequence_parallel: Optional[bool]):
        super().__init__()
        self.tp = state.tensor_parallel
        self.sequence_parallel = state.sequence_parallel if sequence_parallel is None else sequence_parallel

    def _init_weight(self, generator: Optional[torch.Generator], full_shape, fused_sizes) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            full = torch.empty(full_shape, dtype=torch.float32)
            full.normal_(0.0, self.init_std, generator=generator)
            local = split_for_rank(full, self.split_dim, fused_sizes, self.tp.size, self.tp.rank,
                                   fused_heads=getattr(self, "fused_heads", None),
                                   pad_multiple=getattr(self, "pad_multiple", None))
            self.weight.copy_(local.to(self.weight.dtype))
            if getattr(self, "bias", None) is not None:
                self.bias.zero_()


class ColumnParallelLinear(_ParallelLinearBase):
    """``y = x W^T`` with W's output rows split across TP ranks.

    ``out_features`` may be a list: several logical matrices fused into one GEMM (Q/K/V, W1/W3),
    each split across ranks so every rank holds its own slice of each. ``fused_heads`` (heads per
    block) lets a block of fewer heads than ranks be replicated instead: each head on the
    ``tp / heads`` consecutive ranks that read it (GQA's KV heads, placed as Megatron and vLLM
    place them). The first of those ranks owns the head: the others use its value, broadcast in
    forward, and its gradient is the sum of all of theirs (reduced onto it in backward). Their own
    copy gets no gradient, so DeepSpeed's gradient norm, which counts a TP-split parameter on
    every rank, counts each head once, as at TP=1; that copy is never read (nor checkpointed).
    ``pad_multiple`` pads a single block (the vocabulary) to a multiple of it times the TP size.
    """

    split_dim = 0

    def __init__(self, state: ParallelState, in_features: int, out_features, bias: bool = False,
                 gather_output: bool = False, init_std: float = 0.02, sequence_parallel: Optional[bool] = None,
                 part_names: Optional[Sequence[str]] = None, fused_heads: Optional[Sequence[int]] = None,
                 pad_multiple: Optional[int] = None, device=None, dtype=None):
        super().__init__(state, sequence_parallel)
        self.part_names = list(part_names) if part_names else None
        self.fused_sizes = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.fused_heads = list(fused_heads) if fused_heads else None
        self.in_features = in_features
        self.out_features = sum(self.fused_sizes)
        if pad_multiple and (len(self.fused_sizes) > 1 or self.fused_heads):
            raise ValueError("pad_multiple (a padded vocabulary) is for a single output block")
        self.pad_multiple = pad_multiple
        if pad_multiple:
            pieces = [(tp_shard(padded_vocab(self.out_features, self.tp.size, pad_multiple), self.tp.size,
                                "out_features"), 1)]
        else:
            pieces = tp_pieces(self.fused_sizes, self.fused_heads, self.tp.size)
        self.local_sizes = [piece for piece, _ in pieces]
        # runs of adjacent blocks held by as many ranks each: [rows, ranks holding them]
        self.row_runs: List[List[int]] = []
        for piece, rep in pieces:
            if self.row_runs and self.row_runs[-1][1] == rep:
                self.row_runs[-1][0] += piece
            else:
                self.row_runs.append([piece, rep])
        self.replica_groups: Dict[int, TPGroup] = {rep: state.tp_replicas(rep) for _, rep in self.row_runs
                                                   if rep > 1}
        if gather_output and len(self.fused_sizes) > 1:
            raise ValueError("gather_output is not supported for fused outputs")
        self.gather_output = gather_output
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features, device=device, dtype=dtype))
        _mark(self.weight, 0, self.fused_sizes, fused_heads=self.fused_heads, pad_multiple=pad_multiple)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(sum(self.local_sizes), device=device, dtype=dtype))
            _mark(self.bias, 0, self.fused_sizes, fused_heads=self.fused_heads, pad_multiple=pad_multiple)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        self._init_weight(generator, (self.out_features, self.in_features), self.fused_sizes)

    def _runs(self):
        """``(weight, bias)`` rows of each run; a replicated run's as its first rank holds them."""
        sizes = [rows for rows, _ in self.row_runs]
        weights = torch.split(self.weight, sizes)
        biases = torch.split(self.bias, sizes) if self.bias is not None else [None] * len(sizes)
        for w, b, (_, rep) in zip(weights, biases, self.row_runs):
            if rep > 1:
                w = mappings.from_first_rank(w, self.replica_groups[rep])
                b = None if b is None else mappings.from_first_rank(b, self.replica_groups[rep])
            yield w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.tp)
        else:
            x = mappings.copy_to_tp_region(x, self.tp)
        if self.replica_groups:  # one GEMM per run: backward keeps views of the weight, not a copy
            y = torch.cat([F.linear(x, w, b) for w, b in self._runs()], dim=-1)
        else:
            y = F.linear(x, self.weight, self.bias)
        return mappings.gather_from_tp_region(y, self.tp) if self.gather_output else y

    def extra_repr(self) -> str:
        shared = [rep for _, rep in self.row_runs]
        extra = f", replicas={shared}" if any(r > 1 for r in shared) else ""
        return f"in={self.in_features}, out={self.fused_sizes}, local_out={self.local_sizes}{extra}"


class RowParallelLinear(_ParallelLinearBase):
    """``y = x W^T`` with W's input columns split across ranks; partial sums are reduced."""

    split_dim = 1

    def __init__(self, state: ParallelState, in_features: int, out_features: int, bias: bool = False,
                 input_is_parallel: bool = True, init_std: float = 0.02, sequence_parallel: Optional[bool] = None,
                 device=None, dtype=None):
        super().__init__(state, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        self.local_in = tp_shard(in_features, self.tp.size, "in_features")
        self.input_is_parallel = input_is_parallel
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, device=device, dtype=dtype))
        _mark(self.weight, 1, [in_features])
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        self._init_weight(generator, (self.out_features, self.in_features), [self.in_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x, self.tp)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.tp)
        else:
            y = mappings.reduce_from_tp_region(y, self.tp)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, local_in={self.local_in}, out={self.out_features}"


class VocabParallelEmbedding(_ParallelLinearBase):
    """Embedding table split along the vocabulary; each rank embeds the ids it owns. Its shard is
    exactly an output layer's column shard, so a tied head reuses it (:meth:`lm_logits`)."""

    split_dim = 0

    def __init__(self, state: ParallelState, num_embeddings: int, embedding_dim: int, init_std: float = 0.02,
                 sequence_parallel: Optional[bool] = None, pad_multiple: Optional[int] = None, device=None,
                 dtype=None):
        super().__init__(state, sequence_parallel)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.pad_multiple = pad_multiple
        self.local_vocab = tp_shard(padded_vocab(num_embeddings, self.tp.size, pad_multiple), self.tp.size,
                                    "num_embeddings")
        self.vocab_start = self.tp.rank * self.local_vocab
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(self.local_vocab, embedding_dim, device=device, dtype=dtype))
        _mark(self.weight, 0, [num_embeddings], pad_multiple=pad_multiple)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        self._init_weight(generator, (self.num_embeddings, self.embedding_dim), [self.num_embeddings])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.local_vocab)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.tp)
        return mappings.reduce_from_tp_region(out, self.tp)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied output layer: this rank's vocab slice of ``h @ W^T`` (input handled as a
        column-parallel layer does). Autograd sums both uses' gradients into the one shard."""
        if self.sequence_parallel:
            h = mappings.gather_from_sequence_parallel_region(h, self.tp)
        else:
            h = mappings.copy_to_tp_region(h, self.tp)
        return F.linear(h, self.weight)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, local_vocab={self.local_vocab}, dim={self.embedding_dim}"
