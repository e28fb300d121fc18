"""The .bin/.idx format: our writer and reader, interop both ways with megatron-core, corruption."""
import warnings

import numpy as np
import pytest

from megallama.data.indexed import IndexedTokens, IndexedWriter, dtype_for_vocab
from megallama.errors import UserError
from tests.conftest_data import (assert_one_line_error, cli, listing, sample_texts, tokenizer_path,
                                 write_docs, write_jsonl)


@pytest.fixture(scope="module")
def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def random_docs(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 50)) for _ in range(n)]


def test_dtype_follows_megatron_rule(megatron):
    for vocab in (320, 32000, 65499, 65500, 128256):
        assert dtype_for_vocab(vocab) == np.dtype(megatron.DType.optimal_dtype(vocab))


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 32000), (np.int32, 128256)])
def test_write_read_round_trip(tmp_path, dtype, vocab):
    docs = random_docs(40, vocab)
    write_docs(str(tmp_path / "d"), docs, dtype)
    ds = IndexedTokens(str(tmp_path / "d.bin"))  # a .bin/.idx name works as the prefix
    ds.verify()
    assert len(ds) == 40 and ds.dtype == np.dtype(dtype) and ds.num_tokens == sum(map(len, docs))
    for d, doc in enumerate(docs):
        assert np.array_equal(ds[d], doc)
    assert isinstance(ds.tokens, np.memmap)  # zero-copy
    assert ds.max_token_id() == max(int(d.max()) for d in docs)


def test_megatron_builder_files_read_here(tmp_path, megatron):
    import torch

    for dtype, multimodal in ((np.uint16, False), (np.int32, False), (np.uint16, True)):
        prefix = str(tmp_path / f"m_{np.dtype(dtype).name}_{multimodal}")
        builder = megatron.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype, multimodal=multimodal)
        docs = random_docs(30, 30000, seed=1)
        for k, doc in enumerate(docs):
            if k % 3 == 0 and len(doc) > 2:  # documents of several sequences (sentence splitting)
                builder.add_item(torch.tensor(doc[:2]))
                builder.add_item(torch.tensor(doc[2:]))
                builder.end_document()
            else:
                builder.add_document(doc, [len(doc)], modes=[0] if multimodal else None)
        builder.finalize(prefix + ".idx")
        ours = IndexedTokens(prefix)
        ours.verify()
        assert len(ours) == len(docs) and ours.dtype == np.dtype(dtype)
        for d, doc in enumerate(docs):
            assert np.array_equal(ours[d], doc)
        theirs = megatron.IndexedDataset(prefix, multimodal=multimodal)
        assert ours.num_sequences == len(theirs)
        assert np.array_equal(ours.document_indices, theirs.document_indices)


def test_our_files_read_in_megatron(tmp_path, capsys, megatron):
    texts = sample_texts(120)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    rc, _, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tokenizer_path(),
                     "--output-prefix", tmp_path / "c", "--workers", 2)
    assert rc == 0, err
    ours = IndexedTokens(str(tmp_path / "c"))
    theirs = megatron.IndexedDataset(str(tmp_path / "c"))
    assert len(theirs) == len(ours) == 120
    assert theirs.index.dtype == np.uint16
    assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    assert np.array_equal(theirs.document_indices, np.arange(121))
    for i in range(120):
        assert np.array_equal(theirs[i], ours[i])
        assert theirs[i][-1] == 2  # </s> closes every document
    # and Megatron's builder can merge our file into one of its own
    merged = megatron.IndexedDatasetBuilder(str(tmp_path / "merged.bin"), dtype=np.uint16)
    merged.add_index(str(tmp_path / "c"))
    merged.finalize(str(tmp_path / "merged.idx"))
    assert np.array_equal(IndexedTokens(str(tmp_path / "merged")).tokens, ours.tokens)


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    prefix = str(tmp_path / "w")
    with pytest.raises(RuntimeError):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("crash mid-write")
    assert listing(tmp_path) == []  # nothing left, not even temporaries
    write_docs(prefix, [[1, 2, 3]])
    with pytest.raises(UserError, match="w.bin: already exists; pass --overwrite"):
        IndexedWriter(prefix, np.uint16)
    write_docs(prefix, [[4, 5]])  # overwrite=True in the helper
    assert IndexedTokens(prefix)[0].tolist() == [4, 5]


def corrupt(tmp_path, how):
    prefix = str(tmp_path / "x")
    write_docs(prefix, random_docs(20, 1000, seed=3))
    bin_path, idx_path = tmp_path / "x.bin", tmp_path / "x.idx"
    if how == "truncated-bin":
        bin_path.write_bytes(bin_path.read_bytes()[:-6])
    elif how == "longer-bin":
        bin_path.write_bytes(bin_path.read_bytes() + b"\0\0")
    elif how == "truncated-idx":
        idx_path.write_bytes(idx_path.read_bytes()[:-40])
    elif how == "bad-header":
        idx_path.write_bytes(b"NOTMMID" + idx_path.read_bytes()[7:])
    elif how == "mismatched-pair":
        write_docs(str(tmp_path / "y"), random_docs(20, 1000, seed=4))
        bin_path.write_bytes((tmp_path / "y.bin").read_bytes())
    elif how == "missing-bin":
        bin_path.unlink()
    return prefix, {"truncated-bin": "x.bin", "longer-bin": "x.bin", "mismatched-pair": "x.bin",
                    "truncated-idx": "x.idx", "bad-header": "x.idx", "missing-bin": "x.bin"}[how]


@pytest.mark.parametrize("how", ["truncated-bin", "longer-bin", "truncated-idx", "bad-header",
                                 "mismatched-pair", "missing-bin"])
def test_corrupt_files_fail_with_one_line(tmp_path, capsys, how):
    prefix, culprit = corrupt(tmp_path, how)
    rc, out, err = cli(capsys, "data-stats", prefix, "--json")
    assert_one_line_error(rc, err, culprit)
    assert out == ""
    with pytest.raises(UserError, match=culprit):
        IndexedTokens(prefix).verify()


def test_data_stats_json(tmp_path, capsys):
    import json

    write_docs(str(tmp_path / "s"), [[5, 6, 2], [7, 2], [2]])
    rc, out, err = cli(capsys, "data-stats", tmp_path / "s", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert (info["documents"], info["tokens"], info["dtype"], info["max_token_id"]) == (3, 6, "uint16", 7)
    rc, out, _ = cli(capsys, "data-stats", tmp_path / "s.idx")
    assert rc == 0 and "documents" in out


def test_data_stats_checks_ids_against_a_tokenizer(tmp_path, capsys):
    write_docs(str(tmp_path / "s"), [[5, 6, 2], [500, 2]])
    rc, _, err = cli(capsys, "data-stats", tmp_path / "s", "--tokenizer", tokenizer_path())
    assert_one_line_error(rc, err, "s.bin: token id 500 is outside the vocabulary", "tok320.model")
    write_docs(str(tmp_path / "ok"), [[5, 6, 2]])
    rc, out, err = cli(capsys, "data-stats", tmp_path / "ok", "--tokenizer", tokenizer_path(), "--json")
    assert rc == 0 and '"vocab_size": 320' in out
