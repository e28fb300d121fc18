"""`megallama preprocess`: round trips, worker-count independence, and every bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megallama.data.indexed import IndexedTokens
from megallama.data.tokenizer import Tokenizer
from tests.conftest_data import assert_one_line_error, cli, listing, sample_texts, tokenizer_path, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tokenizer_path())


def decoded_docs(prefix, tok):
    ds = IndexedTokens(str(prefix))
    out = []
    for d in range(len(ds)):
        ids = ds[d].tolist()
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return out


def test_round_trip_jsonl(tmp_path, capsys, tok):
    texts = sample_texts(300) + [" leading space", "trailing space ", "tabs\tand\nnew\nlines",
                                 "€ and 😀 ünïcödé"]
    src = write_jsonl(tmp_path / "c.jsonl", texts, key="body")
    rc, out, err = cli(capsys, "preprocess", "--input", src, "--json-key", "body", "--tokenizer", tok.path,
                       "--output-prefix", tmp_path / "c", "--workers", 1)
    assert rc == 0, err
    assert f"{len(texts)} documents" in out and "tokens/s" in out
    assert decoded_docs(tmp_path / "c", tok) == texts


def test_progress_bar_reports_rates(tmp_path, capsys, tok):
    from megallama.data.preprocess import preprocess
    from megallama.data.records import InputSpec

    src = write_jsonl(tmp_path / "c.jsonl", sample_texts(100))
    stats = preprocess(InputSpec((str(src),)), tok, str(tmp_path / "c"), progress=True)
    err = capsys.readouterr().err
    assert "docs/s" in err and "tok/s" in err and stats.documents == 100 and stats.tokens_per_s > 0


def test_workers_give_identical_files(tmp_path, capsys, tok):
    src = write_jsonl(tmp_path / "c.jsonl", sample_texts(3000))
    for w in (1, 2):
        rc, _, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tok.path,
                         "--output-prefix", tmp_path / f"w{w}", "--workers", w)
        assert rc == 0, err
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


@pytest.mark.parametrize("mode", ["line", "paragraph", "file"])
def test_round_trip_text_modes(tmp_path, capsys, tok, mode):
    texts = [t.replace("\n", " ") for t in sample_texts(30)]
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    if mode == "line":
        files[0].write_text("\n".join(texts[:20]) + "\n\n")
        files[1].write_text("\r\n".join(texts[20:]))
        expect = texts
    elif mode == "paragraph":
        paras = ["\n".join(texts[i:i + 3]) for i in range(0, 30, 3)]
        files[0].write_text("\n\n\n".join(paras[:5]) + "\n")
        files[1].write_text("\n\n".join(paras[5:]))
        expect = paras
    else:
        files[0].write_text("\n".join(texts[:20]) + "\n")
        files[1].write_text("\n".join(texts[20:]))
        expect = [files[0].read_text(), files[1].read_text()]
    rc, _, err = cli(capsys, "preprocess", "--input", *files, "--text-doc", mode, "--tokenizer", tok.path,
                     "--output-prefix", tmp_path / "t", "--workers", 1)
    assert rc == 0, err
    assert decoded_docs(tmp_path / "t", tok) == expect


def test_prepend_bos_and_tools_script(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", ["one doc", "another doc"])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
                           "--tokenizer-model", tok.path, "--output-prefix", str(tmp_path / "c"),
                           "--prepend-bos", "--append-eod", "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ds = IndexedTokens(str(tmp_path / "c"))
    assert ds[0].tolist() == [1] + tok.encode("one doc") + [2]


def write_bad(tmp_path, kind):
    """(input file, text the error must contain) for one kind of bad input."""
    good = [json.dumps({"text": t}) for t in sample_texts(50)]
    path = tmp_path / "in.jsonl"
    if kind == "missing-key":
        lines = good[:7] + [json.dumps({"content": "x"})] + good[7:]
        needle = "in.jsonl:8: no key 'text'"
    elif kind == "invalid-json":
        lines = good[:3] + ['{"text": "unterminated'] + good[3:]
        needle = "in.jsonl:4: invalid JSON"
    elif kind == "not-a-string":
        lines = good[:2] + [json.dumps({"text": ["a", "list"]})] + good[2:]
        needle = "in.jsonl:3: 'text' is list"
    elif kind == "empty-doc":
        lines = good[:40] + [json.dumps({"text": "  "})] + good[40:]
        needle = "in.jsonl:41: empty 'text'"
    elif kind == "invalid-utf8":
        data = ("\n".join(good[:12]) + "\n").encode() + b'{"text": "bad \xff byte"}\n' + "\n".join(good[12:]).encode()
        path.write_bytes(data)
        return path, "in.jsonl:13: invalid UTF-8 (byte 0xff"
    elif kind == "empty-text-file":
        path = tmp_path / "in.txt"
        path.write_text("")
        return path, "in.txt:1: empty document"
    elif kind == "missing-input":
        return tmp_path / "nope.jsonl", "nope.jsonl: input file not found"
    path.write_text("\n".join(lines) + "\n")
    return path, needle


BAD = ["missing-key", "invalid-json", "not-a-string", "empty-doc", "invalid-utf8", "empty-text-file",
       "missing-input"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_no_output(tmp_path, capsys, tok, kind):
    src, needle = write_bad(tmp_path, kind)
    out_dir = tmp_path / "out"
    args = ["preprocess", "--input", src, "--tokenizer", tok.path, "--output-prefix", out_dir / "c",
            "--text-doc", "file"]
    rc, _, err = cli(capsys, *args, "--workers", 2 if kind == "empty-doc" else 1)
    assert_one_line_error(rc, err, needle)
    assert not out_dir.exists() or listing(out_dir) == []  # nothing complete-looking, no temporaries
    # existing outputs survive a failed --overwrite run untouched
    good = write_jsonl(tmp_path / "good.jsonl", sample_texts(5))
    assert cli(capsys, "preprocess", "--input", good, "--tokenizer", tok.path, "--output-prefix",
               out_dir / "c", "--workers", 1)[0] == 0
    before = [(out_dir / n).read_bytes() for n in ("c.bin", "c.idx")]
    rc, _, err = cli(capsys, *args, "--overwrite", "--workers", 1)
    assert_one_line_error(rc, err, needle)
    assert [(out_dir / n).read_bytes() for n in ("c.bin", "c.idx")] == before
    assert listing(out_dir) == ["c.bin", "c.idx"]


def test_skip_empty(tmp_path, capsys, tok):
    src, _ = write_bad(tmp_path, "empty-doc")
    rc, out, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tok.path, "--output-prefix",
                       tmp_path / "c", "--skip-empty", "--workers", 1)
    assert rc == 0, err
    assert "50 documents" in out and "1 empty skipped" in out


def test_existing_output_needs_overwrite(tmp_path, capsys, tok):
    src = write_jsonl(tmp_path / "c.jsonl", sample_texts(10))
    args = ["preprocess", "--input", src, "--tokenizer", tok.path, "--output-prefix", tmp_path / "c", "--workers", 1]
    assert cli(capsys, *args)[0] == 0
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "c.bin: already exists", "--overwrite")
    assert cli(capsys, *args, "--overwrite")[0] == 0


def test_not_a_tokenizer(tmp_path, capsys):
    bogus = tmp_path / "tok.model"
    bogus.write_text("I am not a model")
    src = write_jsonl(tmp_path / "c.jsonl", ["x"])
    rc, _, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", bogus, "--output-prefix", tmp_path / "c")
    assert_one_line_error(rc, err, "tok.model: not a SentencePiece model")


def test_cli_subprocess_exit_code_and_stderr(tmp_path, tok):
    src, needle = write_bad(tmp_path, "missing-key")
    proc = subprocess.run([sys.executable, "-m", "megallama", "preprocess", "--input", str(src), "--tokenizer",
                           tok.path, "--output-prefix", str(tmp_path / "c"), "--workers", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.idx").exists()


def test_unwritable_output_is_one_line(tmp_path, capsys, tok):
    src = write_jsonl(tmp_path / "c.jsonl", ["x y z"])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", tok.path,
                     "--output-prefix", blocker / "out", "--workers", 1)
    assert_one_line_error(rc, err, str(blocker))


def test_killed_worker_fails_instead_of_hanging(tmp_path, tok):
    import multiprocessing
    import os
    import signal
    import threading

    from megallama.data.preprocess import preprocess
    from megallama.data.records import InputSpec
    from megallama.errors import UserError

    src = write_jsonl(tmp_path / "c.jsonl", sample_texts(20_000))

    done = threading.Event()

    def kill_first_worker():  # as soon as a worker exists, however slow a loaded machine is to start it
        while not done.wait(0.005):
            children = multiprocessing.active_children()
            if children:
                os.kill(children[0].pid, signal.SIGKILL)
                return

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    try:
        with pytest.raises(UserError, match="worker died"):
            preprocess(InputSpec((str(src),)), tok, str(tmp_path / "out" / "c"), workers=2, progress=False)
    finally:
        done.set()
        killer.join()
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []
