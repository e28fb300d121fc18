"""What the trainer calls: ``prepare_data`` once (rank 0), ``build_datasets`` on every rank.

``prepare_data`` does the slow, writing work: the embedded corpus when no data is configured,
else a full check of the configured files (index consistency, token ids inside the tokenizer's
vocabulary) recorded in a stamp keyed by file size and mtime, so later calls - on any rank, or
after a restart - cost a few ``stat`` calls. ``build_datasets`` only maps files and does
arithmetic; every shuffle is recomputed from the seed, so ranks agree without talking.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

from megallama.data.blending import BlendedDataset
from megallama.data.files import read_json, write_json_atomic
from megallama.data.indexed import IndexedTokens, normalize_prefix
from megallama.data.packing import PackedDataset, split_ranges
from megallama.data.tokenizer import Tokenizer
from megallama.errors import UserError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataArtifacts:
    """Where the prepared data is: token-file prefixes, their blend weights, the tokenizer."""

    prefixes: List[str]
    weights: List[float]
    tokenizer: str
    vocab_size: int
    embedded: bool = False
    tokens: List[int] = field(default_factory=list)


def cache_dir(cfg) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.run_dir) / "data")


def prepare_data(cfg) -> DataArtifacts:
    """Build (embedded corpus) or validate (configured prefixes) the run's data. Idempotent."""
    data, vocab = cfg.data, cfg.model.vocab_size
    if not data.prefixes and not data.sources:
        for name in ("tokenizer", "weights"):
            if getattr(data, name) is not None:
                raise UserError(f"data.{name}: set without data.prefixes or data.sources; the embedded corpus "
                                "trains its own tokenizer (remove it, or list data.prefixes)")
        from megallama.data.embedded import build_embedded

        m = build_embedded(cache_dir(cfg), vocab, data.embedded_max_files)
        return DataArtifacts([m["prefix"]], [1.0], m["tokenizer"], vocab, True, [m["tokens"]])
    if not data.tokenizer:
        raise UserError("data.tokenizer: required with data.prefixes or data.sources (the tokenizer file the "
                        "files were, or are to be, tokenized with)")
    if data.weights is not None and len(data.weights) != len(data.prefixes) + len(data.sources):
        raise UserError(f"data.weights: {len(data.weights)} weights for {len(data.prefixes)} prefixes and "
                        f"{len(data.sources)} sources")
    tok = Tokenizer(data.tokenizer)
    tok.check_vocab(vocab)
    prefixes = [os.path.abspath(normalize_prefix(p)) for p in data.prefixes]
    if data.sources:
        if cfg.model.arch == "encoder_decoder":
            raise UserError("data.sources: for decoder-only models; an encoder-decoder's aligned files come from "
                            "`megallama preprocess --json-keys source target`")
        from megallama.data.source_cache import tokenize_sources

        prefixes += tokenize_sources(cache_dir(cfg), data.sources, data.text_field, tok)
    tokens = [sum(_checked_tokens(cfg, q, tok) for q in _token_files(cfg, p)) for p in prefixes]
    weights = list(data.weights) if data.weights is not None else [float(n) for n in tokens]
    if sum(weights) <= 0:
        raise UserError(f"{prefixes[0]}: the configured token files hold no tokens")
    return DataArtifacts(prefixes, weights, os.path.abspath(data.tokenizer), vocab, False, tokens)


def _checked_tokens(cfg, prefix: str, tok: Tokenizer) -> int:
    """Token count of ``prefix`` after a full check, remembered until a file changes."""
    stamp_path = cache_dir(cfg) / "validated.json"
    ids = IndexedTokens(prefix)  # cheap structural checks, every time
    key = [_file_id(ids.idx_path), _file_id(ids.bin_path), tok.vocab_size]
    stamps = read_json(stamp_path)
    stamps = stamps if isinstance(stamps, dict) else {}
    if stamps.get(prefix) != key:
        ids.verify()
        top = ids.max_token_id()
        if top >= tok.vocab_size:
            raise UserError(f"{ids.bin_path}: token id {top} is outside the vocabulary of {tok.path} "
                            f"({tok.vocab_size} tokens); were these files made with another tokenizer?")
        stamps[prefix] = key
        write_json_atomic(stamp_path, stamps)
    return ids.num_tokens


def _token_files(cfg, prefix: str) -> Tuple[str, ...]:
    """The files behind a prefix: itself, or an encoder-decoder's aligned source and target."""
    if cfg.model.arch == "encoder_decoder":
        from megallama.data.seq2seq import pair_prefixes

        return pair_prefixes(prefix) or (prefix,)
    return (prefix,)


def _file_id(path: str) -> List[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def build_datasets(cfg, art: DataArtifacts) -> Tuple[object, object, object]:
    """(train, valid, test): packed, blended datasets of ``seq_len + 1``-token samples, with their
    document ids under ``data.document_mask`` (an encoder-decoder's rows instead:
    :mod:`megallama.data.seq2seq`).

    Valid or test may be empty (``len() == 0``) when the split gives them too few tokens; train
    may not. Every prefix is split by documents with ``data.split``, then the prefixes blend.
    """
    if cfg.model.arch == "encoder_decoder":
        from megallama.data.seq2seq import build_seq2seq_datasets

        return _combine(build_seq2seq_datasets(cfg, art), cfg)
    seq_len, seed = cfg.train.seq_len, cfg.train.seed
    shuffle = cfg.data.shuffle
    parts: List[List[Tuple[PackedDataset, float]]] = [[], [], []]
    for p, (prefix, weight) in enumerate(zip(art.prefixes, art.weights)):
        ids = IndexedTokens(prefix)
        for s, docs in enumerate(split_ranges(len(ids), cfg.data.split)):
            ds = PackedDataset(ids, docs, seq_len, seed=(seed, p, s) if shuffle else None,
                               name=f"{prefix} ({SPLITS[s]} split, documents {docs[0]}:{docs[1]})",
                               documents=cfg.data.document_mask)
            parts[s].append((ds, weight))
    return _combine(parts, cfg)


def _combine(parts, cfg) -> Tuple[object, object, object]:
    """One dataset per split: the usable parts blended by weight."""
    seq_len, seed = cfg.train.seq_len, cfg.train.seed
    out = []
    for s, items in enumerate(parts):
        usable = [(d, w) for d, w in items if len(d)]
        if s == 0 and len(usable) < len(items):
            bad = next(d for d, _ in items if not len(d))
            raise UserError(f"{bad.name}: {bad.num_tokens} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
                            "add data, shorten train.seq_len, or give train a larger data.split share")
        if not usable:
            out.append(items[0][0])
        elif len(usable) == 1:
            out.append(usable[0][0])
        else:
            blend = BlendedDataset([d for d, _ in usable], [w for _, w in usable], seed=(seed, 0xB1E, s))
            blend.name = f"{SPLITS[s]} blend of {len(usable)} datasets"
            out.append(blend)
    return out[0], out[1], out[2]
