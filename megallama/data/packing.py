"""GPT-style packing: documents laid end to end, cut into ``seq_len + 1``-token samples.

Sample ``i`` of an epoch is stream tokens ``[i*L, i*L + L + 1)`` (L = seq_len), so consecutive
samples share one token, as in Megatron's GPTDataset: inputs ``s[:-1]`` and labels ``s[1:]``
each cover every token of the epoch's stream exactly once (bar a tail shorter than a sample).
With a seed, each epoch lays the documents out in its own order and then serves the packed
samples in a shuffled order (Megatron's document and shuffle indices), so the dataset's order is
final: samplers read it front to back, which keeps every cache here sequential. Indices past
``len()`` continue into later epochs: ``ds[e * len(ds) + i]`` is sample i of epoch e.

With ``documents=True`` a sample is ``[2, seq_len + 1]``: its tokens and, under them, which
document of the sample each token comes from (0, 1, ... in order), read off the index's
document boundaries, for document-aware attention (``data.document_mask``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megallama.data.indexed import IndexedTokens
from megallama.errors import UserError


def parse_split(split: str) -> List[float]:
    """'98,1,1' -> three normalized shares (missing ones are 0)."""
    shares = [float(x) for x in split.replace("/", ",").split(",")]
    shares += [0.0] * (3 - len(shares))
    total = sum(shares)
    if len(shares) != 3 or total <= 0 or min(shares) < 0:
        raise UserError(f"data.split: expected up to three non-negative shares like '98,1,1', got '{split}'")
    return [x / total for x in shares]


def split_ranges(n_docs: int, split: str) -> List[Tuple[int, int]]:
    """Contiguous document ranges for train/valid/test, rounded the way Megatron rounds."""
    bounds = [0]
    for share in parse_split(split):
        bounds.append(bounds[-1] + int(round(share * n_docs)))
    diff = bounds[-1] - n_docs
    bounds = [0] + [b - diff for b in bounds[1:]]
    return [(max(0, bounds[k]), max(0, bounds[k + 1])) for k in range(3)]


def seed_rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


class PackedDataset:
    """Packed samples over documents ``[first, last)`` of an indexed file."""

    final_order = True  # already in training order: samplers must not shuffle it again

    def __init__(self, tokens: IndexedTokens, docs: Tuple[int, int], seq_len: int,
                 seed: Optional[Sequence[int]] = None, name: str = "", documents: bool = False):
        self.tokens, self.seq_len, self.seed, self.documents = tokens, int(seq_len), seed, documents
        self.first, self.last = docs
        self.name = name or f"{tokens.prefix}[{self.first}:{self.last}]"
        starts = tokens.doc_offsets[self.first:self.last]
        self._doc_start = np.asarray(starts, np.int64)
        self._doc_len = np.asarray(tokens.doc_offsets[self.first + 1:self.last + 1] - starts, np.int64)
        self.num_tokens = int(self._doc_len.sum())
        self._samples = max(0, (self.num_tokens - 1) // self.seq_len)
        self._epochs: "OrderedDict[int, Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]" = OrderedDict()

    def __len__(self) -> int:
        """Samples per epoch."""
        return self._samples

    def _layout(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(document order, cumulative token count, sample order) of one epoch; three kept."""
        hit = self._epochs.get(epoch)
        if hit is None:
            n = len(self._doc_len)
            if self.seed is None:
                order, samples = np.arange(n), None
            else:
                rng = seed_rng(*self.seed, epoch)
                order, samples = rng.permutation(n), rng.permutation(self._samples)
            cum = np.zeros(n + 1, np.int64)
            np.cumsum(self._doc_len[order], out=cum[1:])
            hit = self._epochs[epoch] = (order, cum, samples)
            while len(self._epochs) > 3:
                self._epochs.popitem(last=False)
        return hit

    def __getitem__(self, index: int) -> np.ndarray:
        if self._samples == 0:
            raise IndexError(f"{self.name}: no samples ({self.num_tokens} tokens < seq_len + 1)")
        if index < 0:
            raise IndexError(f"negative sample index {index}")
        epoch, i = divmod(int(index), self._samples)
        order, cum, samples = self._layout(epoch)
        if samples is not None:
            i = int(samples[i])
        out = np.zeros((1 + self.documents, self.seq_len + 1), np.int64)  # tokens; the document of each
        pos, end = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        k = int(np.searchsorted(cum, pos, side="right")) - 1
        filled, part = 0, 0
        while filled < out.shape[1]:
            doc = order[k]
            lo = pos - cum[k]
            take = min(int(self._doc_len[doc] - lo), end - pos)
            start = self._doc_start[doc] + lo
            out[0, filled:filled + take] = self.tokens.tokens[start:start + take]
            if self.documents:
                out[1, filled:filled + take] = part
            filled, pos, k, part = filled + take, pos + take, k + 1, part + (take > 0)
        return out if self.documents else out[0]

    def __iter__(self):
        """One epoch (indexing alone never ends)."""
        return (self[i] for i in range(len(self)))
