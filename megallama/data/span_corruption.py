"""T5's span-corruption objective, for training an encoder-decoder on plain text.

Of ``L`` raw tokens, ``round(L * 0.15)`` (noise density) are masked in ``round(noise / 3)``
spans (mean span length 3); noise and kept tokens are each cut into that many spans at random,
and the spans alternate, kept first. The encoder input is the kept tokens with each masked span
replaced by one sentinel; the target lists each sentinel followed by the tokens it replaced.
Both end with ``</s>``. These are the published T5 settings (Raffel et al. 2020, section 3.1.4).

Sentinels must be ids that never occur in text. T5 appends 100 extra ids to its vocabulary; our
LLaMA-style tokenizers have byte-fallback pieces instead, and 13 of the 256 bytes (0xC0, 0xC1,
0xF5-0xFF) can never appear in UTF-8, so their pieces never come out of encoding text: those are
the sentinels. With more spans than that, spans are merged (fewer, longer spans) so each sample
uses each sentinel at most once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from megallama.errors import UserError

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
UNUSED_UTF8_BYTES = [0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF9, 0xF8, 0xF7, 0xF6, 0xF5, 0xC1, 0xC0]


def sentinel_ids(tokenizer) -> List[int]:
    """The byte-fallback pieces of never-valid UTF-8 bytes, in sentinel order."""
    ids = [tokenizer.piece_id(f"<0x{b:02X}>") for b in UNUSED_UTF8_BYTES]
    if any(i is None or i < 0 for i in ids):
        raise UserError(f"{tokenizer.path}: span corruption needs the byte-fallback pieces <0xF5>..<0xFF> as "
                        "sentinels and this tokenizer has none (train it with byte_fallback, as "
                        "`megallama preprocess --train-tokenizer` does)")
    return ids


@dataclass(frozen=True)
class SpanLengths:
    """How one sample splits: raw tokens, masked tokens and spans, encoder and target lengths."""

    raw: int
    noise: int
    spans: int

    @property
    def inputs(self) -> int:
        return self.raw - self.noise + self.spans + 1

    @property
    def targets(self) -> int:
        return self.noise + self.spans + 1


def span_lengths(raw: int, max_spans: int) -> SpanLengths:
    noise = min(max(int(round(raw * NOISE_DENSITY)), 1), raw - 1)
    spans = max(1, min(int(round(noise / MEAN_SPAN)), max_spans, raw - noise))
    return SpanLengths(raw, noise, spans)


def lengths_for_input(src_len: int, max_spans: int) -> SpanLengths:
    """The longest raw sample whose corrupted form fits an encoder input of ``src_len`` tokens."""
    if src_len < 4:
        raise UserError(f"train.seq_len: {src_len} is too short for span corruption (at least 4 tokens)")
    best = span_lengths(2, max_spans)
    raw = 2
    while True:
        cand = span_lengths(raw + 1, max_spans)
        if cand.inputs > src_len:
            return best
        best, raw = cand, raw + 1


def _partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` positive lengths, uniformly over such splits."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1) if parts > 1 else np.empty(0, np.int64)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def corrupt(tokens: np.ndarray, sizes: SpanLengths, sentinels: List[int], eos: int,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(encoder input, target) of one ``sizes.raw``-token sample."""
    noise = _partition(sizes.noise, sizes.spans, rng)
    kept = _partition(sizes.raw - sizes.noise, sizes.spans, rng)
    inputs, targets, pos = [], [], 0
    for k in range(sizes.spans):
        inputs.append(tokens[pos:pos + kept[k]])
        pos += kept[k]
        inputs.append([sentinels[k]])
        targets.append([sentinels[k]])
        targets.append(tokens[pos:pos + noise[k]])
        pos += noise[k]
    inputs.append([eos])
    targets.append([eos])
    return np.concatenate(inputs).astype(np.int64), np.concatenate(targets).astype(np.int64)


SENTINEL_TEXT = "<extra_id_{}>"  # T5's spelling, for reading and writing sentinels in text


def encode_with_sentinels(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` in which ``<extra_id_K>`` stands for sentinel K."""
    import re

    sentinels, ids = sentinel_ids(tokenizer), []
    for k, part in enumerate(re.split(r"<extra_id_(\d+)>", text)):
        if k % 2:
            if int(part) >= len(sentinels):
                raise UserError(f"<extra_id_{part}>: only {len(sentinels)} sentinels (0-{len(sentinels) - 1})")
            ids.append(sentinels[int(part)])
        elif part:
            ids += tokenizer.encode(part)
    return ids


def decode_with_sentinels(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids`` with each sentinel written ``<extra_id_K>`` (plain decoding shows U+FFFD)."""
    try:
        index = {s: k for k, s in enumerate(sentinel_ids(tokenizer))}
    except UserError:
        return tokenizer.decode(ids)
    out, run = [], []
    for i in ids:
        if int(i) in index:
            out += [tokenizer.decode(run), SENTINEL_TEXT.format(index[int(i)])]
            run = []
        else:
            run.append(i)
    return "".join(out + [tokenizer.decode(run)])
