"""``convert`` of a training checkpoint without ``--tokenizer`` takes the run's ``data.tokenizer``
(recorded in each checkpoint's meta.json): the Hugging Face export reads with AutoTokenizer as the
run tokenized; an explicit ``--tokenizer`` still wins; a recorded file that is gone is one line,
exit 2, nothing written."""
import json
import shutil
from pathlib import Path

import pytest

from megallama.data.tokenizer import Tokenizer
from tests.conftest_data import assert_one_line_error, cli, sample_texts, tokenizer_path, write_jsonl
from tests.train_utils import run_train, tiny_run_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """One step on raw JSONL tokenized at start with a tokenizer kept in its own directory, saved."""
    tmp = tmp_path_factory.mktemp("convert_tok")
    (tmp / "tok").mkdir()
    tok = tmp / "tok" / "tokenizer.model"
    shutil.copyfile(tokenizer_path(), tok)
    src = write_jsonl(tmp / "docs.jsonl", sample_texts(120, seed=5))
    cfg = tiny_run_config(tmp, data_cache, steps=1, seq_len=32)
    run_train(cfg, ["model.vocab_size=320", f"data.sources=[{src}]", f"data.tokenizer={tok}",
                    f"data.cache_dir={tmp / 'cache'}", "data.split=90,5,5", "checkpoint.every=1",
                    f"run_dir={tmp / 'run'}"])
    return tmp, tok


def test_export_takes_the_runs_tokenizer(trained, tmp_path, capsys):
    from transformers import AutoTokenizer

    tmp, tok = trained
    meta = json.loads(next((tmp / "run" / "checkpoints").glob("step*/meta.json")).read_text())
    assert meta["data"] == {"tokenizer": str(tok)}
    rc, out, err = cli(capsys, "convert", "--to", "hf", "--input", tmp / "run" / "checkpoints",
                       "--output", tmp_path / "hf")
    assert rc == 0, err
    assert f"tokenizer {tok}" in out
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tok.read_bytes()
    ours, hf_tok = Tokenizer(tok), AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in sample_texts(5, seed=11) + ["", "x"]:
        assert hf_tok(text)["input_ids"] == ours.encode(text, bos=True)
    # a resharded copy keeps the record, so its export finds the tokenizer too
    rc, _, err = cli(capsys, "convert", "--input", tmp / "run" / "checkpoints", "--output", tmp_path / "re", "--tp", 2)
    assert rc == 0, err
    rc, out, err = cli(capsys, "convert", "--to", "hf", "--input", tmp_path / "re", "--output", tmp_path / "hf2")
    assert rc == 0 and f"tokenizer {tok}" in out, err
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_explicit_tokenizer_wins(trained, tmp_path, capsys):
    from megallama.data.tokenizer import train_tokenizer

    tmp, tok = trained
    other = tmp_path / "other.model"  # another vocabulary of the model's 320 rows
    train_tokenizer(sample_texts(300, seed=1), str(other), 320, num_threads=1)
    rc, _, err = cli(capsys, "convert", "--to", "hf", "--input", tmp / "run" / "checkpoints",
                     "--output", tmp_path / "hf", "--tokenizer", other)
    assert rc == 0, err
    written = (tmp_path / "hf" / "tokenizer.model").read_bytes()
    assert written == other.read_bytes() != tok.read_bytes()


def test_recorded_tokenizer_gone_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    tmp, tok = trained
    moved = tmp / "tok-moved"
    (tmp / "tok").rename(moved)
    try:
        rc, _, err = cli(capsys, "convert", "--to", "hf", "--input", tmp / "run" / "checkpoints",
                         "--output", tmp_path / "out")
        assert rc == 2
        assert_one_line_error(rc, err, "meta.json: data.tokenizer", str(tok), "not found", "--tokenizer")
        assert not (tmp_path / "out").exists()
        rc, _, err = cli(capsys, "convert", "--to", "hf", "--input", tmp / "run" / "checkpoints",
                         "--output", tmp_path / "out", "--tokenizer", moved / "tokenizer.model")
        assert rc == 0, err  # the flag is the way out
    finally:
        moved.rename(tmp / "tok")


def test_embedded_corpus_run_exports_its_own_tokenizer(tmp_path, data_cache, capsys):
    """A run on the embedded corpus names no data.tokenizer; the checkpoint records the tokenizer
    its tokens were made with (the corpus's, in the data cache), and the export carries it."""
    cfg = tiny_run_config(tmp_path, data_cache, steps=1, seq_len=32)
    run_train(cfg, ["checkpoint.every=1", f"run_dir={tmp_path / 'run'}"])
    tok = next(data_cache.glob("embedded-*/tokenizer.model")).resolve()
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step*/meta.json")).read_text())
    assert meta["data"] == {"tokenizer": str(tok)}
    rc, out, err = cli(capsys, "convert", "--to", "hf", "--input", tmp_path / "run" / "checkpoints",
                       "--output", tmp_path / "hf")
    assert rc == 0 and f"tokenizer {tok}" in out, err
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_generate_takes_the_runs_tokenizer(trained):
    """``generate --checkpoint`` on a training checkpoint without ``--tokenizer`` uses the one its
    run recorded (before: 'tokenizer.model not found')."""
    import subprocess
    import sys

    from tests.train_utils import ROOT, env

    tmp, _ = trained
    proc = subprocess.run([sys.executable, "-m", "megallama", "generate", "--checkpoint", str(tmp / "run" / "checkpoints"),
                           "--prompt", "import os", "--max-new-tokens", "3", "--json"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))
    assert len(got["results"]) == 1


def test_finetune_takes_the_runs_tokenizer(trained, tmp_path):
    """``finetune --pretrained`` on a training checkpoint without ``--tokenizer`` tokenizes with the
    one its run recorded (before: 'tokenizer.model not found'), and the classifier it saves
    carries that file."""
    import subprocess

    from tests.train_utils import ROOT, env, launch_cmd

    tmp, tok = trained
    (tmp_path / "task.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                                                 for i, t in enumerate(sample_texts(40, seed=3))))
    proc = subprocess.run(launch_cmd("none", 1) + [
        "finetune", str(tmp / "run.yaml"), "--pretrained", str(tmp / "run" / "checkpoints"), "--data", str(tmp_path / "task.jsonl"),
        "--set", "train.steps=2", "--set", "train.seq_len=16", "--set", "train.micro_batch_size=4",
        "--set", "train.global_batch_size=4", "--set", f"run_dir={tmp_path / 'ft'}"],
        capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (Path(report["checkpoint"]) / "tokenizer.model").read_bytes() == tok.read_bytes()
