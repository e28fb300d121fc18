"""`megallama preprocess` from where people keep data: every source's token files equal the JSONL path's
on the same texts (byte for byte), filters, progress accounting, and a one-line error for each bad input."""
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megallama.data.indexed import IndexedTokens
from megallama.data.records import InputSpec, batches
from tests.conftest_data import assert_one_line_error, cli, listing, sample_texts, tokenizer_path
from tests.train_utils import env

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = sample_texts(70) + ["€ and 😀 ünïcödé", " leading space", "tabs\tand\nnew\nlines"]
RECORDS = [{"id": i, "text": t, "lang": "fr" if i % 3 == 0 else "en", "score": i % 5} for i, t in enumerate(TEXTS)]


def jsonl_bytes(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_source(tmp_path: Path, kind: str, records) -> str:
    """``records`` stored as ``kind``; returns the path to pass to --input."""
    half = len(records) // 2
    if kind == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_bytes(jsonl_bytes(records))
    elif kind == "gz":
        path = tmp_path / "c.jsonl.gz"
        path.write_bytes(gzip.compress(jsonl_bytes(records[:half])) + gzip.compress(jsonl_bytes(records[half:])))
    elif kind == "zst":
        zstd = pytest.importorskip("zstandard")
        c = zstd.ZstdCompressor()  # two frames, as pzstd and concatenated files have
        path = tmp_path / "c.jsonl.zst"
        path.write_bytes(c.compress(jsonl_bytes(records[:half])) + c.compress(jsonl_bytes(records[half:])))
    elif kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=16)
    elif kind == "parquet-dir":
        path = tmp_path / "shards"
        path.mkdir()
        pq.write_table(pa.Table.from_pylist(records[:half]), path / "part-0.parquet")
        pq.write_table(pa.Table.from_pylist(records[half:]), path / "part-1.parquet")
        (path / "README.md").write_text("not data")
    elif kind in ("arrow-file", "arrow-stream"):
        schema = pa.schema([("id", pa.int64()), ("text", pa.large_string()), ("lang", pa.string()),
                            ("score", pa.int64())])
        table = pa.Table.from_pylist(records, schema=schema)
        path = tmp_path / "c.arrow"
        new = pa.ipc.new_file if kind == "arrow-file" else pa.ipc.new_stream
        with new(str(path), schema) as w:
            for batch in table.to_batches(max_chunksize=10):
                w.write_batch(batch)
    elif kind == "datasets":
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path), num_shards=2)
    else:
        raise AssertionError(kind)
    return str(path)


def outputs(prefix: Path):
    return [Path(str(prefix) + ext).read_bytes() for ext in (".bin", ".idx")]


@pytest.fixture(scope="module")
def tok_path():
    return tokenizer_path()


@pytest.fixture
def reference(tmp_path, capsys, tok_path):
    """The JSONL path's token files for RECORDS."""
    def make(*flags, records=RECORDS):
        src = write_source(tmp_path, "jsonl", records)
        rc, out, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tok_path, "--output-prefix",
                           tmp_path / "ref", "--workers", 1, "--overwrite", *flags)
        assert rc == 0, err
        return outputs(tmp_path / "ref"), out
    return make


@pytest.mark.parametrize("kind", ["gz", "zst", "parquet", "parquet-dir", "arrow-file", "arrow-stream", "datasets"])
def test_source_tokens_equal_jsonl(tmp_path, capsys, tok_path, reference, kind):
    expect, _ = reference()
    src = write_source(tmp_path, kind, RECORDS)
    rc, out, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tok_path, "--output-prefix",
                       tmp_path / "out", "--workers", 1)
    assert rc == 0, err
    assert f"{len(TEXTS)} documents" in out
    assert outputs(tmp_path / "out") == expect


def test_stdin_tokens_equal_jsonl(tmp_path, reference, tok_path):
    expect, _ = reference()
    proc = subprocess.run([sys.executable, "-m", "megallama", "preprocess", "--input", "-", "--tokenizer", tok_path,
                           "--output-prefix", str(tmp_path / "out"), "--workers", "1"],
                          input=jsonl_bytes(RECORDS), capture_output=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert outputs(tmp_path / "out") == expect


def test_stdin_plain_text_in_process(tmp_path, capsys, monkeypatch, tok_path):
    lines = [t.replace("\n", " ").replace("\t", " ") for t in TEXTS]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli(capsys, "preprocess", "--input", tmp_path / "c.txt", "--tokenizer", tok_path, "--output-prefix",
               tmp_path / "ref", "--workers", 1)[0] == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((tmp_path / "c.txt").read_bytes())))
    rc, _, err = cli(capsys, "preprocess", "--input", "-", "--input-format", "text", "--tokenizer", tok_path,
                     "--output-prefix", tmp_path / "out", "--workers", 1)
    assert rc == 0, err
    assert outputs(tmp_path / "out") == outputs(tmp_path / "ref")


def kept(records, min_chars=0, **equals):
    return [r for r in records if all(str(r[k]) == v for k, v in equals.items()) and len(r["text"]) >= min_chars]


def test_filters_keep_the_expected_documents(tmp_path, capsys, tok_path, reference):
    want = kept(RECORDS, 120, lang="en", score="2")
    assert 0 < len(want) < len(RECORDS) // 5
    filtered, out = reference("--filter", "lang=en", "--filter", "score=2", "--min-chars", 120)
    assert f"{len(want)} documents" in out and f"{len(RECORDS) - len(want)} filtered out" in out
    expect, _ = reference(records=want)
    assert filtered == expect
    tok = __import__("megallama.data.tokenizer", fromlist=["Tokenizer"]).Tokenizer(tok_path)
    ds = IndexedTokens(str(tmp_path / "ref"))
    assert [tok.decode(ds[d].tolist()[:-1]) for d in range(len(ds))] == [r["text"] for r in want]


def test_table_filters_in_workers_equal_jsonl(tmp_path, capsys, tok_path, reference):
    """Rows travel to spawned workers as dicts and are filtered there by the JSONL path's rule."""
    flags = ("--filter", "lang=fr", "--min-chars", 60, "--text-field", "text")
    expect, _ = reference(*flags)
    src = write_source(tmp_path, "parquet", RECORDS)
    rc, out, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tok_path, "--output-prefix",
                       tmp_path / "out", "--workers", 2, *flags)
    assert rc == 0, err
    assert outputs(tmp_path / "out") == expect and "filtered out" in out


@pytest.mark.parametrize("kind", ["parquet", "datasets", "arrow-file", "arrow-stream", "gz", "zst"])
def test_progress_counts_every_source_byte(tmp_path, kind):
    src = write_source(tmp_path, kind, RECORDS)
    spec = InputSpec((src,))
    spec.check()
    files = [os.path.join(src, f) for f in os.listdir(src) if f.endswith(".arrow")] if os.path.isdir(src) else [src]
    used = [n for _, n in batches(spec, max_records=7)]
    assert sum(used) == sum(os.path.getsize(f) for f in files) and len(used) > 3


def bad_input(tmp_path, kind):
    """(extra argv, text the one-line error must contain) for one kind of bad input."""
    if kind == "missing-column":
        return ["--input", write_source(tmp_path, "parquet", RECORDS), "--text-field", "body"], \
            "c.parquet: no column 'body' (columns: id, text, lang, score); check --text-field"
    if kind == "filter-column":
        return ["--input", write_source(tmp_path, "parquet", RECORDS), "--filter", "language=en"], \
            "c.parquet: no column 'language'"
    if kind == "int-column":
        return ["--input", write_source(tmp_path, "parquet", RECORDS), "--text-field", "id"], \
            "c.parquet: column 'id' is int64, expected a string column"
    if kind == "null-text":
        rows = [dict(r) for r in RECORDS]
        rows[40]["text"] = None
        return ["--input", write_source(tmp_path, "parquet", rows)], "c.parquet row 40: 'text' is null"
    if kind == "jsonl-missing-filter-key":
        rows = [dict(r) for r in RECORDS]
        del rows[5]["lang"]
        return ["--input", write_source(tmp_path, "jsonl", rows), "--filter", "lang=en"], \
            "c.jsonl:6: no key 'lang' for --filter lang=en"
    if kind == "bad-filter":
        return ["--input", write_source(tmp_path, "jsonl", RECORDS), "--filter", "lang"], \
            "--filter: expected FIELD=VALUE"
    if kind == "filter-on-text":
        (tmp_path / "a.txt").write_text("hello\n")
        return ["--input", tmp_path / "a.txt", "--filter", "lang=en"], "a.txt: --filter needs records with fields"
    if kind == "corrupt-gz":
        data = gzip.compress(jsonl_bytes(RECORDS))
        (tmp_path / "c.jsonl.gz").write_bytes(data[:len(data) // 2])
        return ["--input", tmp_path / "c.jsonl.gz"], "c.jsonl.gz: not readable as gzip data"
    if kind == "not-zstd":
        (tmp_path / "c.jsonl.zst").write_bytes(jsonl_bytes(RECORDS))
        return ["--input", tmp_path / "c.jsonl.zst"], "c.jsonl.zst: not readable as zstd data"
    if kind == "corrupt-parquet":
        (tmp_path / "c.parquet").write_bytes(b"PAR1" + os.urandom(200))
        return ["--input", tmp_path / "c.parquet"], "c.parquet: not readable as parquet"
    if kind == "unknown-format":
        import zipfile

        with zipfile.ZipFile(tmp_path / "corpus.txt", "w") as z:
            z.writestr("a.jsonl", "{}")
        return ["--input", tmp_path / "corpus.txt"], "corpus.txt: unknown input format (zip data); accepted: JSONL"
    if kind == "url":
        return ["--input", "hf://datasets/allenai/c4"], "hf://datasets/allenai/c4: not a local path; preprocess " \
            "reads local paths only and downloads nothing"
    if kind == "hub-name":
        return ["--input", "allenai/c4"], "allenai/c4: input file not found (a hub dataset?"
    if kind == "dataset-dict":
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_list(RECORDS[:4])
        datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
        return ["--input", tmp_path / "dd"], f"dd: a DatasetDict with splits train, test; pass one split's " \
            f"directory, e.g. {tmp_path / 'dd' / 'train'}"
    if kind == "empty-dir":
        (tmp_path / "empty").mkdir()
        return ["--input", tmp_path / "empty"], "empty: no .parquet or .arrow files and no save_to_disk state.json"
    if kind == "stdin-twice":
        return ["--input", "-", "--train-tokenizer", "--vocab-size", 300], "--input -: standard input can be read once"
    if kind == "pairs-from-parquet":
        return ["--input", write_source(tmp_path, "parquet", RECORDS), "--json-keys", "text", "lang"], \
            "c.parquet: two --json-keys read JSONL files (each twice), not parquet"
    raise AssertionError(kind)


BAD = ["missing-column", "filter-column", "int-column", "null-text", "jsonl-missing-filter-key", "bad-filter",
       "filter-on-text", "corrupt-gz", "not-zstd", "corrupt-parquet", "unknown-format", "url", "hub-name",
       "dataset-dict", "empty-dir", "stdin-twice", "pairs-from-parquet"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_source_one_line_no_output(tmp_path, capsys, tok_path, kind):
    argv, needle = bad_input(tmp_path, kind)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _, err = cli(capsys, "preprocess", *argv, "--tokenizer", tmp_path / "new.model" if kind == "stdin-twice"
                     else tok_path, "--output-prefix", out_dir / "c", "--workers", 1)
    assert_one_line_error(rc, err, needle)
    assert rc == 2 and listing(out_dir) == []


def run_cfg(tmp_path, **data):
    from megallama.config import load_run_config

    return load_run_config(data={"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "vocab_size": 320},
                                 "train": {"seq_len": 32, "seed": 3},
                                 "data": {"tokenizer": tokenizer_path(), "split": "80,10,10", **data}})


def test_data_sources_are_the_indexed_path(tmp_path, capsys, reference):
    """data.sources (tokenized at start) gives the same token files, hence the same samples in the same
    order, as data.prefixes on the JSONL path's output; later starts reuse the cache, a changed file is retokenized."""
    from megallama.data.prepare import build_datasets, prepare_data

    expect, _ = reference()
    src = write_source(tmp_path, "datasets", RECORDS)
    cfg = run_cfg(tmp_path, sources=[src])
    art = prepare_data(cfg)
    assert outputs(art.prefixes[0]) == expect and art.tokens == [len(Path(art.prefixes[0] + ".bin").read_bytes()) // 2]
    ref = prepare_data(run_cfg(tmp_path / "r", prefixes=[str(tmp_path / "ref")]))
    for ours, theirs in zip(build_datasets(cfg, art), build_datasets(cfg, ref)):
        assert len(ours) == len(theirs) > 0
        assert all((ours[i] == theirs[i]).all() for i in range(len(ours)))
    manifest = Path(art.prefixes[0]).parent / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert prepare_data(cfg) == art and manifest.stat().st_mtime_ns == stamp  # cached
    jsonl = write_source(tmp_path, "jsonl", RECORDS[:40])
    cfg2 = run_cfg(tmp_path, sources=[jsonl], text_field="text")
    first = prepare_data(cfg2).prefixes[0]
    Path(jsonl).write_bytes(jsonl_bytes(RECORDS[:30]))
    second = prepare_data(cfg2).prefixes[0]
    assert second != first and len(IndexedTokens(second)) == 30


def test_data_sources_bad_input_one_line(tmp_path):
    from megallama.config.schema import ConfigError
    from megallama.data.prepare import prepare_data
    from megallama.errors import UserError

    src = write_source(tmp_path, "parquet", RECORDS)
    with pytest.raises(UserError, match=r"^data\.sources: .*c\.parquet: no column 'body'"):
        prepare_data(run_cfg(tmp_path, sources=[src], text_field="body"))
    with pytest.raises(UserError, match=r"^data\.weights: 2 weights for 0 prefixes and 1 sources$"):
        prepare_data(run_cfg(tmp_path, sources=[src], weights=[1, 2]))
    with pytest.raises(ConfigError, match="standard input"):
        run_cfg(tmp_path, sources=["-"])
    assert not (tmp_path / "run" / "data" / "sources").exists() or \
        all(not list(d.glob("tokens.*")) for d in (tmp_path / "run" / "data" / "sources").iterdir())
