"""Helpers shared by tests/test_data_*.py (a plain module, not a pytest conftest).

The small tokenizer is trained once per test session and cached in a temporary directory.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import List, Sequence

import numpy as np

from megallama.cli import main

_TMP = tempfile.mkdtemp(prefix="megallama-data-tests-")
atexit.register(shutil.rmtree, _TMP, True)

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "def return import class lambda yield 0 1 2 3 42 1999 café naïve über ñ").split()


def sample_texts(n: int, seed: int = 0) -> List[str]:
    """Documents with spaces, tabs, newlines, digits and non-ASCII letters."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        for k in range(0, len(words), 9):
            words[k] = rng.choice(["\n", "\n    ", "\t", "  "]) + words[k]
        out.append(f"doc {i}: " + " ".join(words))
    return out


def tokenizer_path(vocab_size: int = 320) -> str:
    """A LLaMA-style tokenizer trained on sample_texts (cached for the session).

    Keyed by the resolved vocab size: ``tokenizer_path()`` and ``tokenizer_path(320)`` are one file.
    """
    return _trained_tokenizer(int(vocab_size))


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(vocab_size: int) -> str:
    from megallama.data.tokenizer import train_tokenizer

    path = os.path.join(_TMP, f"tok{vocab_size}.model")
    if not os.path.exists(path):
        train_tokenizer(sample_texts(400, seed=99), path, vocab_size, num_threads=1)
    return path


def write_jsonl(path: Path, texts: Sequence[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": i, key: text}) + "\n")
    return path


def write_docs(prefix: str, docs: Sequence[Sequence[int]], dtype=np.uint16) -> str:
    """Token files with exactly these documents (our writer)."""
    from megallama.data.indexed import IndexedWriter

    with IndexedWriter(prefix, dtype, overwrite=True) as w:
        for doc in docs:
            w.add_document(np.asarray(doc, dtype))
    return prefix


def cli(capsys, *argv: str):
    """Run ``megallama ARGV`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def listing(directory: Path) -> List[str]:
    return sorted(p.name for p in Path(directory).iterdir())
