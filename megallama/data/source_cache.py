"""``data.sources``: raw documents tokenized when a run starts, so a small run needs no preprocess step.

Each source (anything ``megallama preprocess --input`` reads but standard input) is tokenized once,
on rank 0, by the preprocessing pipeline (streamed) into ``CACHE/sources/NAME-KEY/tokens.bin/.idx``.
KEY hashes what decides the tokens: each file's path, size and mtime, the tokenizer file's bytes and
the text field; a manifest written last marks the directory complete, so a restart costs a ``stat``
per file. From there on a source is an ordinary prefix: the indexed path's sample order, blending
and resume exactness hold unchanged, because it is that path.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List

from megallama.data import sources
from megallama.data.files import read_json, write_json_atomic
from megallama.data.records import InputSpec
from megallama.errors import UserError

FORMAT = 1


def tokenize_sources(cache_root: Path, source_list: List[str], text_field: str, tok) -> List[str]:
    """One token-file prefix per source, in order, built where missing or stale."""
    return [_tokenized(cache_root, s, text_field, tok) for s in source_list]


def _tokenized(cache_root: Path, source: str, text_field: str, tok) -> str:
    from megallama.data.preprocess import preprocess

    try:
        paths = sources.expand([source])
        spec = InputSpec(paths, json_key=text_field, skip_empty=True)  # an empty text has no tokens to train on
        spec.check()
        key = _key(spec, text_field, tok.path)
        out = Path(cache_root) / "sources" / f"{Path(source).name or 'source'}-{key}"
        prefix, manifest_path = str(out / "tokens"), out / "manifest.json"
        manifest = read_json(manifest_path)
        if isinstance(manifest, dict) and manifest.get("key") == key and os.path.isfile(prefix + ".idx"):
            return prefix
        out.mkdir(parents=True, exist_ok=True)
        stats = preprocess(spec, tok, prefix, workers=1, overwrite=True, progress=False)
    except UserError as exc:
        raise UserError(f"data.sources: {exc}") from None
    write_json_atomic(manifest_path, {"key": key, "source": os.path.abspath(source), "text_field": text_field,
                                      "tokenizer": tok.path, "documents": stats.documents, "tokens": stats.tokens,
                                      "empty_skipped": stats.skipped})  # last: marks the directory complete
    return prefix


def _key(spec: InputSpec, text_field: str, tokenizer_path: str) -> str:
    files = []
    for path in spec.paths:
        for f in sources.files_of(path, spec.fmt):
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    h = hashlib.sha256(json.dumps([FORMAT, files, text_field]).encode())
    with open(tokenizer_path, "rb") as fh:
        h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]
