"""Encoder-decoder samples: paired source/target files, or span corruption of plain text.

A sample is one int64 row ``[source (S) | BOS, target (T)]`` padded with -1, so the sampler,
the blend and the data-parallel slicing of the decoder path carry it unchanged; S is
``train.seq_len`` and T :func:`target_len`. :func:`split_batch` turns rows into model inputs:
the decoder input is the target shifted right behind BOS (the decoder-start token), labels are
the target with -100 on padding.

A prefix ``P`` is paired when ``P_source`` and ``P_target`` exist (``megallama preprocess
--json-keys source target`` writes them, document ``d`` of one aligned with ``d`` of the other);
otherwise ``P`` is plain text and trains with span corruption.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from megallama.data.indexed import IndexedTokens
from megallama.data.packing import PackedDataset, seed_rng, split_ranges
from megallama.data.span_corruption import SpanLengths, corrupt, lengths_for_input, sentinel_ids
from megallama.errors import UserError

if TYPE_CHECKING:  # torch stays out of preprocessing workers' imports
    import torch

PAD = -1
SIDES = ("source", "target")


def pair_prefixes(prefix: str) -> Optional[Tuple[str, str]]:
    """``(P_source, P_target)`` when ``prefix`` names a paired set, else None."""
    found = [os.path.isfile(f"{prefix}_{side}.idx") for side in SIDES]
    if all(found):
        return f"{prefix}_source", f"{prefix}_target"
    if any(found) and not os.path.isfile(prefix + ".idx"):
        missing = SIDES[found.index(False)]
        raise UserError(f"{prefix}_{missing}.idx: not found (paired data needs both {prefix}_source and "
                        f"{prefix}_target)")
    return None


def _row(src: np.ndarray, tgt: np.ndarray, src_len: int, tgt_len: int, bos: int) -> np.ndarray:
    out = np.full(src_len + tgt_len + 1, PAD, np.int64)
    out[:len(src)] = src
    out[src_len] = bos
    out[src_len + 1:src_len + 1 + len(tgt)] = tgt
    return out


def _clip(doc: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` tokens, keeping the closing ``</s>``."""
    return doc if len(doc) <= n else np.concatenate([doc[:n - 1], doc[-1:]])


class PairedDataset:
    """Aligned documents ``[first, last)`` of a source and a target file, in seeded order."""

    final_order = True

    def __init__(self, src: IndexedTokens, tgt: IndexedTokens, docs: Tuple[int, int], src_len: int, tgt_len: int,
                 bos: int, seed: Optional[Sequence[int]] = None, name: str = ""):
        self.src, self.tgt, self.first, self.last = src, tgt, docs[0], docs[1]
        self.src_len, self.tgt_len, self.bos, self.seed = src_len, tgt_len, bos, seed
        self.name = name or f"{src.prefix}[{self.first}:{self.last}]"
        self.num_tokens = int(src.doc_offsets[self.last] - src.doc_offsets[self.first])
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, index: int) -> np.ndarray:
        if index < 0 or len(self) == 0:
            raise IndexError(f"{self.name}: no sample {index}")
        epoch, i = divmod(int(index), len(self))
        if self.seed is not None:
            if self._order[0] != epoch:
                self._order = (epoch, seed_rng(*self.seed, epoch).permutation(len(self)))
            i = int(self._order[1][i])
        d = self.first + i
        return _row(_clip(self.src[d], self.src_len), _clip(self.tgt[d], self.tgt_len), self.src_len,
                    self.tgt_len, self.bos)


class SpanCorruptionDataset:
    """Packed plain text, each sample span-corrupted with its own seeded draw (so any rank, and
    any resumed run, builds the same sample at the same position)."""

    final_order = True

    def __init__(self, ids: IndexedTokens, docs: Tuple[int, int], sizes: SpanLengths, src_len: int, tgt_len: int,
                 sentinels: List[int], bos: int, eos: int, seed: Optional[Sequence[int]] = None, name: str = ""):
        self.packed = PackedDataset(ids, docs, sizes.raw - 1, seed=seed, name=name)
        self.name, self.num_tokens = self.packed.name, self.packed.num_tokens
        self.sizes, self.src_len, self.tgt_len = sizes, src_len, tgt_len
        self.sentinels, self.bos, self.eos = sentinels, bos, eos
        self.seed = tuple(seed) if seed is not None else (0,)

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, index: int) -> np.ndarray:
        rng = seed_rng(*self.seed, 0x5BA2, int(index))
        src, tgt = corrupt(self.packed[index], self.sizes, self.sentinels, self.eos, rng)
        return _row(src, tgt, self.src_len, self.tgt_len, self.bos)


class Seq2SeqBatch(NamedTuple):
    src: "torch.Tensor"  # [b, S] token ids (padding as 0)
    src_mask: "Optional[torch.Tensor]"  # [b, S] bool, or None when nothing is padded
    tgt: "torch.Tensor"  # [b, T] decoder input: BOS + target[:-1]
    labels: "torch.Tensor"  # [b, T] target, -100 on padding


def split_batch(rows, src_len: int) -> Seq2SeqBatch:
    """Model inputs from a ``[b, S + T + 1]`` LongTensor of rows."""
    src, dec = rows[:, :src_len], rows[:, src_len:]
    valid = src != PAD
    labels = dec[:, 1:]
    return Seq2SeqBatch(src.clamp(min=0), None if bool(valid.all()) else valid, dec[:, :-1].clamp(min=0),
                        labels.masked_fill(labels == PAD, -100))


def target_len(cfg, paired: bool, max_spans: int) -> int:
    """Decoder length T: ``train.seq_len`` for paired data, else span corruption's target length,
    rounded up to a multiple of 8 (sequence parallelism splits it like the source)."""
    seq = cfg.train.seq_len
    t = seq if paired else lengths_for_input(seq, max_spans).targets
    t = -(-t // 8) * 8
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and (t % tp or seq % tp):
        raise UserError(f"parallel.tp: {tp} must divide the encoder-decoder's target length {t} and "
                        f"train.seq_len {seq} with sequence_parallel")
    return t


def build_seq2seq_datasets(cfg, art) -> List[object]:
    """Per prefix and split, paired or span-corruption datasets of one common row layout."""
    from megallama.data.tokenizer import Tokenizer

    tok = Tokenizer(art.tokenizer)
    if tok.bos_id < 0:
        raise UserError(f"{tok.path}: the encoder-decoder needs a BOS token to start decoding (bos_id = -1)")
    seq, seed, shuffle = cfg.train.seq_len, cfg.train.seed, cfg.data.shuffle
    pairs = [pair_prefixes(p) for p in art.prefixes]
    sentinels = sentinel_ids(tok) if not all(pairs) else []
    tgt_len = target_len(cfg, any(pairs), len(sentinels))
    if tgt_len > cfg.model.max_seq_len:
        raise UserError(f"train.seq_len: the decoder's {tgt_len} positions (rounded up to a multiple of 8) exceed "
                        f"model.max_seq_len={cfg.model.max_seq_len}")
    sizes = lengths_for_input(seq, len(sentinels)) if sentinels else None
    parts: List[List[Tuple[object, float]]] = [[], [], []]
    for p, (prefix, pair, weight) in enumerate(zip(art.prefixes, pairs, art.weights)):
        files = [IndexedTokens(x) for x in pair] if pair else [IndexedTokens(prefix)]
        if pair and len(files[0]) != len(files[1]):
            raise UserError(f"{pair[1]}.idx: {len(files[1])} documents, but {pair[0]}.idx has {len(files[0])}; "
                            "paired files must align document by document")
        for s, docs in enumerate(split_ranges(len(files[0]), cfg.data.split)):
            name = f"{prefix} ({('train', 'valid', 'test')[s]} split, documents {docs[0]}:{docs[1]})"
            sd = (seed, p, s) if shuffle else None
            if pair:
                ds = PairedDataset(files[0], files[1], docs, seq, tgt_len, tok.bos_id, sd, name)
            else:
                ds = SpanCorruptionDataset(files[0], docs, sizes, seq, tgt_len, sentinels, tok.bos_id, tok.eod_id,
                                           sd, name)
            parts[s].append((ds, weight))
    return parts
