"""Packing, splits, blending, the DP iterator's restart determinism, and prepare/build_datasets."""
import time

import numpy as np
import pytest
import torch

from megallama.config import load_run_config
from megallama.data import BlendedDataset, MicroBatchIterator, PackedDataset, build_datasets, prepare_data
from megallama.data.indexed import IndexedTokens
from megallama.data.packing import split_ranges
from megallama.errors import UserError
from tests.conftest_data import tokenizer_path, write_docs


def unique_docs(tmp_path, name="u", n_docs=57, seed=0, base=0):
    """Documents whose tokens are all distinct ids (base + 0, 1, 2, ...): every token is traceable."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, n_docs)
    ids = np.arange(base, base + lengths.sum())
    docs = np.split(ids, np.cumsum(lengths)[:-1])
    return IndexedTokens(write_docs(str(tmp_path / name), docs, np.int32)), docs


def chain(samples):
    """Put packed samples back in stream order: each one starts with the token the previous ends on."""
    by_first = {int(s[0]): s for s in samples}
    lasts = {int(s[-1]) for s in samples}
    head = [s for s in samples if int(s[0]) not in lasts]
    assert len(head) == 1
    out = [head[0]]
    while int(out[-1][-1]) in by_first:
        out.append(by_first[int(out[-1][-1])])
    assert len(out) == len(samples)
    return np.concatenate([out[0]] + [s[1:] for s in out[1:]])


@pytest.mark.parametrize("seed", [None, (7, 0, 0)])
def test_packing_covers_every_token_once_per_epoch(tmp_path, seed):
    ids, docs = unique_docs(tmp_path)
    L = 16
    ds = PackedDataset(ids, (0, len(ids)), L, seed=seed)
    total = ids.num_tokens
    assert len(ds) == (total - 1) // L
    epochs = []
    for e in range(3):
        samples = [ds[e * len(ds) + i] for i in range(len(ds))]
        assert all(s.shape == (L + 1,) and s.dtype == np.int64 for s in samples)
        inputs = np.concatenate([s[:-1] for s in samples])
        labels = np.concatenate([s[1:] for s in samples])
        for part in (inputs, labels):  # each token at most once; only a tail shorter than a sample is missing
            assert len(np.unique(part)) == len(part) == len(ds) * L
            assert total - len(part) <= L
        # samples are consecutive pieces of one stream of whole documents laid end to end
        stream = chain(samples)
        starts = {int(d[0]): d for d in docs}
        pos = 0
        while pos < len(stream):
            doc = starts[int(stream[pos])]
            assert np.array_equal(stream[pos:pos + len(doc)], doc[:len(stream) - pos])
            pos += len(doc)
        epochs.append((inputs, stream))
    if seed is None:
        assert np.array_equal(epochs[0][0], np.arange(len(epochs[0][0])))
    else:
        assert not np.array_equal(epochs[0][1], epochs[1][1])  # each epoch has its own document order
        assert not np.array_equal(np.sort(epochs[0][0]), epochs[0][0])  # and serves samples shuffled


def test_split_ranges_megatron_rounding():
    assert split_ranges(1000, "98,1,1") == [(0, 980), (980, 990), (990, 1000)]
    assert split_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges(7, "0.8,0.1,0.1") == [(0, 5), (5, 6), (6, 7)]


def counting_dataset(tag, n):
    class Counting:
        name = tag

        def __len__(self):
            return n

        def __getitem__(self, i):
            return np.array([tag, i])
    return Counting()


def test_blending_follows_weights():
    weights = [0.5, 0.3, 0.15, 0.05]
    blend = BlendedDataset([counting_dataset(t, 1000 + 77 * t) for t in range(4)], weights, seed=(3,))
    n = 50_000
    got = np.array([blend[i] for i in range(n)])
    counts = np.bincount(got[:, 0], minlength=4)
    assert np.allclose(counts / n, weights, atol=0.005)
    for t in range(4):  # every component is read in order, each index once
        assert np.array_equal(got[got[:, 0] == t, 1], np.arange(counts[t]))
    for start in (0, 777, 31_000):  # any prefix of the blend tracks the weights within one block
        for stop in (start + 2048, start + 10_000):
            part = np.bincount(got[start:stop, 0], minlength=4)
            assert np.all(np.abs(part - np.asarray(weights) * (stop - start)) <= blend.block)
    # random access far ahead agrees with sequential access
    fresh = BlendedDataset([counting_dataset(t, 1000 + 77 * t) for t in range(4)], weights, seed=(3,))
    assert all(np.array_equal(fresh[i], got[i]) for i in (49_999, 12_345, 0))


def run_batches(ds, G, micro, dp, steps, consumed=0, seed=11):
    """Global batches (position order) as seen by dp ranks with micro-batch ``micro``."""
    accum = G // (micro * dp)
    its = [MicroBatchIterator(ds, micro, accum, r, dp, consumed_samples=consumed, seed=seed) for r in range(dp)]
    out = []
    for _ in range(steps):
        parts = []
        for _ in range(accum):
            for it in its:
                batch = next(it)
                assert batch.dtype == torch.int64 and batch.shape == (micro, ds_len(ds))
                parts.append(batch)
        assert len({it.consumed_samples for it in its}) == 1
        out.append(torch.cat(parts))
    return out, its[0].consumed_samples


def ds_len(ds):
    return len(ds[0])


@pytest.fixture(scope="module")
def blended(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    a, _ = unique_docs(tmp, "a", 40, seed=1)
    b, _ = unique_docs(tmp, "b", 25, seed=2, base=10_000)
    parts = [PackedDataset(x, (0, len(x)), 8, seed=(5, k, 0)) for k, x in enumerate((a, b))]
    return BlendedDataset(parts, [0.7, 0.3], seed=(5,))


def test_restart_at_any_dp_sees_the_same_batches(blended):
    G, steps = 24, 30  # 30 * 24 = 720 samples > len(blended): crosses epochs
    assert steps * G > len(blended)
    ref, consumed = run_batches(blended, G, micro=3, dp=2, steps=steps)
    assert consumed == steps * G
    flat = torch.cat(ref)
    assert len({tuple(r.tolist()) for r in flat[:len(blended)]}) > 0.9 * len(blended)  # shuffled, not repeats
    for dp, micro in ((1, 4), (4, 2), (8, 3), (2, 12)):
        other, _ = run_batches(blended, G, micro=micro, dp=dp, steps=steps)
        assert all(torch.equal(x, y) for x, y in zip(ref, other)), (dp, micro)
    for k in (1, 7, 19):
        for dp, micro in ((2, 3), (3, 2), (6, 4)):
            resumed, _ = run_batches(blended, G, micro=micro, dp=dp, steps=steps - k, consumed=k * G)
            assert all(torch.equal(x, y) for x, y in zip(ref[k:], resumed)), (k, dp, micro)


def test_seed_changes_order(tmp_path):
    ids, _ = unique_docs(tmp_path, "s", 30)
    a, b, a2 = (PackedDataset(ids, (0, len(ids)), 8, seed=(s, 0, 0)) for s in (1, 2, 1))
    assert not np.array_equal(np.stack([a[i] for i in range(20)]), np.stack([b[i] for i in range(20)]))
    assert np.array_equal(np.stack([a[i] for i in range(20)]), np.stack([a2[i] for i in range(20)]))


def test_iterator_shuffles_plain_datasets_per_epoch():
    data = [np.array([i, i]) for i in range(10)]
    it = MicroBatchIterator(data, 5, 1, 0, 1, seed=4)
    epochs = [torch.cat([next(it), next(it)])[:, 0].tolist() for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(10))
    it = MicroBatchIterator(data, 4, 1, 0, 1, seed=None)
    assert [next(it)[:, 0].tolist() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_iterator_rejects_bad_layouts(blended, tmp_path):
    with pytest.raises(ValueError):
        MicroBatchIterator(blended, 2, 1, dp_rank=2, dp_size=2)
    ids, _ = unique_docs(tmp_path, "small", 2)
    empty = PackedDataset(ids, (0, len(ids)), 10_000)
    with pytest.raises(UserError, match="no samples"):
        MicroBatchIterator(empty, 1, 1, 0, 1)


# ---------------------------------------------------------------------------- prepare / build
def tiny_cfg(tmp_path, **data):
    return load_run_config(data={"run_dir": str(tmp_path / "run"), "model": "tiny",
                                 "train": {"seq_len": 32, "seed": 3}, "data": data})


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb")
    cfg = tiny_cfg(tmp, embedded_max_files=60)
    start = time.perf_counter()
    art = prepare_data(cfg)
    return cfg, art, time.perf_counter() - start


def test_embedded_corpus(embedded):
    cfg, art, seconds = embedded
    assert art.embedded and art.vocab_size == 2048 and len(art.prefixes) == 1
    assert art.prefixes[0].startswith(cfg.run_dir)
    ids = IndexedTokens(art.prefixes[0])
    assert len(ids) == 60 and ids.max_token_id() < 2048
    start = time.perf_counter()
    again = prepare_data(cfg)  # cached: no retraining, same artifacts
    assert again == art and time.perf_counter() - start < min(1.0, seconds)
    train, valid, test = build_datasets(cfg, art)
    assert len(train) > 100 and len(valid) > 0 and len(test) > 0
    batch = next(MicroBatchIterator(train, 4, 1, 0, 1, seed=cfg.train.seed))
    assert batch.shape == (4, 33)
    from megallama.data.tokenizer import Tokenizer

    text = Tokenizer(art.tokenizer).decode(np.concatenate([train[i] for i in range(200)]).tolist())
    assert all(word in text for word in ("def ", "return", "self"))  # real Python source


def test_embedded_files_are_deterministic_and_exclude_tests():
    from megallama.data.embedded import stdlib_dir, stdlib_files

    files = stdlib_files(50)
    assert files == stdlib_files(50) and len(files) == 50
    rel = [f.relative_to(stdlib_dir()).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfgd")
    rng = np.random.default_rng(0)
    a = write_docs(str(tmp / "a"), [rng.integers(3, 320, rng.integers(5, 80)) for _ in range(200)])
    b = write_docs(str(tmp / "b"), [rng.integers(3, 320, rng.integers(5, 80)) for _ in range(100)])
    return tmp, a, b


def test_configured_prefixes_blend(configured):
    tmp, a, b = configured
    cfg = tiny_cfg(tmp, prefixes=[a, b + ".bin"], weights=[2, 1], tokenizer=tokenizer_path(), split="90,5,5")
    cfg.model.vocab_size = 320
    art = prepare_data(cfg)
    assert art.weights == [2, 1] and art.prefixes == [a, b]
    train, valid, test = build_datasets(cfg, art)
    assert isinstance(train, BlendedDataset) and len(valid) > 0
    assert train[5].shape == (33,)
    again = build_datasets(cfg, art)[0]
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 500, 37))  # rebuilt identically


def test_vocab_mismatch_names_the_tokenizer(configured):
    tmp, a, _ = configured
    cfg = tiny_cfg(tmp, prefixes=[a], tokenizer=tokenizer_path())  # tiny's vocab is 2048, tokenizer's 320
    with pytest.raises(UserError, match=r"tok320\.model: tokenizer has 320 tokens but model\.vocab_size is 2048"):
        prepare_data(cfg)


def test_token_ids_outside_vocab_name_the_bin(tmp_path):
    bad = write_docs(str(tmp_path / "big"), [[5, 6, 400, 2]])
    cfg = tiny_cfg(tmp_path, prefixes=[bad], tokenizer=tokenizer_path())
    cfg.model.vocab_size = 320
    with pytest.raises(UserError, match=r"big\.bin: token id 400 is outside the vocabulary"):
        prepare_data(cfg)


def test_prepare_errors_are_one_line(tmp_path, configured):
    _, a, _ = configured
    cases = [dict(prefixes=[a]), dict(prefixes=[str(tmp_path / "nope")], tokenizer=tokenizer_path()),
             dict(tokenizer=tokenizer_path()), dict(prefixes=[a], weights=[1, 2], tokenizer=tokenizer_path())]
    for data in cases:
        cfg = tiny_cfg(tmp_path, **data)
        cfg.model.vocab_size = 320
        with pytest.raises(UserError) as info:
            prepare_data(cfg)
        assert "\n" not in str(info.value)


def test_train_split_too_small(tmp_path):
    p = write_docs(str(tmp_path / "short"), [[5, 6, 2]] * 4)
    cfg = tiny_cfg(tmp_path, prefixes=[p], tokenizer=tokenizer_path())
    cfg.model.vocab_size = 320
    with pytest.raises(UserError, match="fewer than train.seq_len"):
        build_datasets(cfg, prepare_data(cfg))
