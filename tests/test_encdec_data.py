"""Encoder-decoder data: T5 span corruption, paired source/target files, and row -> batch."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from megallama.data.packing import seed_rng
from megallama.data.seq2seq import PAD, PairedDataset, _row, split_batch
from megallama.data.span_corruption import (UNUSED_UTF8_BYTES, corrupt, decode_with_sentinels, encode_with_sentinels,
                                            lengths_for_input, sentinel_ids, span_lengths)
from megallama.data.tokenizer import Tokenizer
from tests.conftest_data import assert_one_line_error, cli, listing, sample_texts, tokenizer_path

SENTINELS = list(range(1000, 1013))


def _restore(inputs, targets):
    """Undo span corruption: put each sentinel's span back where the sentinel stands."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[t] if t in SENTINELS else [t]
    return out


@given(st.integers(8, 400), st.integers(0, 2**31))
def test_span_corruption_is_t5s_split_and_loses_nothing(raw, seed):
    sizes = span_lengths(raw, len(SENTINELS))
    assert sizes.noise == max(1, round(raw * 0.15))
    assert sizes.spans == max(1, min(round(sizes.noise / 3), len(SENTINELS)))
    tokens = np.arange(raw) + 3
    inputs, targets = corrupt(tokens, sizes, SENTINELS, 2, seed_rng(seed))
    assert len(inputs) == sizes.inputs and len(targets) == sizes.targets
    assert inputs[-1] == targets[-1] == 2
    used = [t for t in inputs if t in SENTINELS]
    assert used == SENTINELS[:sizes.spans] == [t for t in targets if t in SENTINELS]
    assert inputs[0] not in SENTINELS  # kept tokens first, as in T5
    assert _restore(list(inputs), list(targets)) == list(tokens)


def test_mean_span_length_is_three():
    sizes = span_lengths(200, 100)  # 30 noise tokens in 10 spans
    assert (sizes.noise, sizes.spans) == (30, 10)
    rng = seed_rng(1)
    lens = []
    for _ in range(200):
        _, targets = corrupt(np.arange(200) + 3, sizes, list(range(1000, 1100)), 2, rng)
        lens += [len(s) for s in np.split(targets[:-1], np.nonzero(targets[:-1] >= 1000)[0])[1:]]
    assert abs(np.mean(lens) - 1 - 3.0) < 1e-9  # each target span is a sentinel + its tokens


@pytest.mark.parametrize("seq", [4, 32, 64, 500])
def test_lengths_fit_the_encoder(seq):
    sizes = lengths_for_input(seq, 13)
    assert sizes.inputs <= seq < span_lengths(sizes.raw + 1, 13).inputs


def test_sentinels_never_come_out_of_text():
    tok = Tokenizer(tokenizer_path())
    ids = sentinel_ids(tok)
    assert len(set(ids)) == len(UNUSED_UTF8_BYTES)
    text = "".join(sample_texts(50)) + "".join(chr(c) for c in range(1, 0x3000, 7))
    assert not set(ids) & set(tok.encode(text))
    both = encode_with_sentinels(tok, "x = <extra_id_0> + <extra_id_12>")
    assert ids[0] in both and ids[12] in both
    assert decode_with_sentinels(tok, both) == "x = <extra_id_0> + <extra_id_12>"


def test_rows_become_shifted_decoder_inputs_and_masked_labels():
    rows = torch.from_numpy(np.stack([_row(np.array([5, 6, 2]), np.array([7, 8, 9, 2]), 4, 5, 1),
                                      _row(np.array([5, 6, 7, 2]), np.array([2]), 4, 5, 1)]))
    b = split_batch(rows, 4)
    assert b.src.tolist() == [[5, 6, 2, 0], [5, 6, 7, 2]]
    assert b.src_mask.tolist() == [[True, True, True, False], [True] * 4]
    assert b.tgt.tolist() == [[1, 7, 8, 9, 2], [1, 2, 0, 0, 0]]
    assert b.labels.tolist() == [[7, 8, 9, 2, -100], [2, -100, -100, -100, -100]]
    full = split_batch(rows[1:], 4)
    assert full.src_mask is None  # nothing padded: no mask, the fast attention path


def _pairs(path, n, bad_line=None):
    with open(path, "w") as fh:
        for i, text in enumerate(sample_texts(n, seed=3)):
            row = {"source": text, "target": " ".join(reversed(text.split()))}
            if i == bad_line:
                row.pop("target")
            fh.write(json.dumps(row) + "\n")
    return path


def test_preprocess_two_keys_writes_aligned_source_and_target(tmp_path, capsys):
    tok = tokenizer_path()
    src = _pairs(tmp_path / "pairs.jsonl", 30)
    rc, out, err = cli(capsys, "preprocess", "--input", src, "--json-keys", "source", "target", "--tokenizer", tok,
                       "--output-prefix", tmp_path / "p", "--workers", "1", "--no-progress")
    assert rc == 0, err
    from megallama.data import IndexedTokens

    s, t, T = IndexedTokens(str(tmp_path / "p_source")), IndexedTokens(str(tmp_path / "p_target")), Tokenizer(tok)
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    assert len(s) == len(t) == 30
    for d in (0, 17, 29):
        assert T.decode(s[d]) == rows[d]["source"] and T.decode(t[d]) == rows[d]["target"]
    ds = PairedDataset(s, t, (0, 30), 8, 8, T.bos_id, seed=(1,))
    row = ds[4]
    assert len(row) == 17 and row[8] == T.bos_id
    assert row[7] in (T.eos_id, PAD) and T.eos_id in row[:8]  # clipped sources keep their </s>
    assert [ds[i].tolist() for i in range(30)] != [ds[i].tolist() for i in range(30, 60)]  # epochs reshuffle


def test_preprocess_two_keys_failure_leaves_nothing(tmp_path, capsys):
    tok = tokenizer_path()
    src = _pairs(tmp_path / "pairs.jsonl", 20, bad_line=12)
    before = listing(tmp_path)
    rc, _, err = cli(capsys, "preprocess", "--input", src, "--json-keys", "source", "target", "--tokenizer", tok,
                     "--output-prefix", tmp_path / "p", "--workers", "1", "--no-progress")
    assert_one_line_error(rc, err, "pairs.jsonl:13", "'target'")
    assert listing(tmp_path) == before  # the finished source side is not left behind either
    rc, _, err = cli(capsys, "preprocess", "--input", src, "--json-keys", "source", "target", "--skip-empty",
                     "--tokenizer", tok, "--output-prefix", tmp_path / "p")
    assert_one_line_error(rc, err, "--skip-empty")
    rc, _, err = cli(capsys, "preprocess", "--input", src, "--json-keys", "a", "b", "c", "--tokenizer", tok,
                     "--output-prefix", tmp_path / "p")
    assert_one_line_error(rc, err, "--json-keys")
    assert listing(tmp_path) == before
