"""The default corpus: the running interpreter's standard-library source, on every machine.

Real, permissively licensed (PSF) Python code that needs no download. Files are the ``.py``
sources under ``sysconfig``'s stdlib directory, test suites and site-packages excluded, sorted,
and ``max_files`` of them taken evenly across that list (deterministic, and more varied than the
first N alphabetically). A tokenizer of the model's vocabulary size is trained on them, the files
are tokenized (one document each), and everything lands in a directory named by a hash of what
went in; its ``manifest.json``, written last, marks it complete, so a second call is free.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List

from megallama.data.files import read_json, write_json_atomic
from megallama.data.preprocess import preprocess
from megallama.data.records import InputSpec, iter_texts
from megallama.data.tokenizer import train_tokenizer
from megallama.errors import UserError

FORMAT = 1
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int) -> List[Path]:
    """``max_files`` non-empty stdlib sources, evenly spaced over the sorted list."""
    root = stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and path.stat().st_size > 0:
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise UserError(f"{root}: no standard-library sources found for the embedded corpus; "
                        "set data.prefixes and data.tokenizer")
    if len(found) <= max_files:
        return found
    step = len(found) / max_files
    return [found[int(k * step)] for k in range(max_files)]


def _utf8_files(files: List[Path]) -> List[Path]:
    """Files that decode as UTF-8 (a few stdlib modules declare other encodings)."""
    ok = []
    for path in files:
        try:
            path.read_bytes().decode("utf-8")
            ok.append(path)
        except UnicodeDecodeError:
            pass
    return ok


def cache_key(files: List[Path], vocab_size: int) -> str:
    root = stdlib_dir()
    h = hashlib.sha256(json.dumps([FORMAT, sys.version, str(root), vocab_size]).encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_embedded(cache_root: Path, vocab_size: int, max_files: int) -> Dict:
    """Tokenizer + token files for the stdlib corpus under ``cache_root``; the manifest."""
    files = _utf8_files(stdlib_files(max_files))
    key = cache_key(files, vocab_size)
    out = Path(cache_root) / f"embedded-{key}"
    manifest_path, tok_path, prefix = out / "manifest.json", out / "tokenizer.model", str(out / "stdlib")
    manifest = read_json(manifest_path)
    if not (isinstance(manifest, dict) and manifest.get("key") == key and tok_path.is_file()
            and os.path.isfile(prefix + ".idx")):
        out.mkdir(parents=True, exist_ok=True)
        spec = InputSpec(tuple(str(p) for p in files), fmt="text", text_doc="file")
        try:
            tok = train_tokenizer(iter_texts(spec), str(tok_path), vocab_size, overwrite=True,
                                  max_sentences=400_000)
        except UserError as exc:
            raise UserError(f"model.vocab_size: {vocab_size} does not fit the embedded corpus "
                            f"(data.embedded_max_files={max_files}): {exc}") from None
        stats = preprocess(spec, tok, prefix, workers=1, overwrite=True, progress=False)
        manifest = {"key": key, "vocab_size": vocab_size, "documents": stats.documents, "tokens": stats.tokens,
                    "python": sys.version.split()[0], "stdlib": str(stdlib_dir()),
                    "files": [p.relative_to(stdlib_dir()).as_posix() for p in files]}
        write_json_atomic(manifest_path, manifest)  # last: marks the directory complete
    return {**manifest, "prefix": prefix, "tokenizer": str(tok_path)}
