"""Paired JSONL (``{"source": ..., "target": ...}``) -> aligned ``P_source`` / ``P_target`` token files.

Each side is tokenized by the ordinary preprocessing pipeline from the same records, so
document ``d`` of one file is record ``d``'s other half. Both sides are staged under hidden
names and renamed into place only when both are complete and hold the same number of documents:
a failure on either side leaves no output and replaces nothing.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import List, Sequence, Tuple

from megallama.data.files import refuse_existing, remove_quietly
from megallama.data.indexed import normalize_prefix
from megallama.data.preprocess import PreprocessStats, preprocess
from megallama.data.records import InputSpec
from megallama.errors import UserError


def pair_outputs(prefix: str, keys: Sequence[str]) -> List[str]:
    """The two output prefixes: Megatron's ``PREFIX_KEY`` naming with the roles as keys."""
    return [f"{normalize_prefix(prefix)}_{role}" for role in ("source", "target")[:len(keys)]]


def check_keys(keys: Sequence[str], skip_empty: bool) -> None:
    if len(keys) != 2 or keys[0] == keys[1]:
        raise UserError(f"--json-keys: expected one key, or two different ones (source, target), got {list(keys)}")
    if skip_empty:
        raise UserError("--skip-empty: not with two --json-keys (dropping a record from one side would misalign "
                        "the pairs)")


def preprocess_pairs(spec: InputSpec, keys: Sequence[str], tokenizer, output_prefix: str, *, workers: int = 1,
                     bos: bool = False, overwrite: bool = False, progress=None) -> Tuple[PreprocessStats, ...]:
    """Tokenize ``keys[0]`` into ``PREFIX_source`` and ``keys[1]`` into ``PREFIX_target``."""
    check_keys(keys, spec.skip_empty)
    finals = pair_outputs(output_prefix, keys)
    refuse_existing([f + ext for f in finals for ext in (".bin", ".idx")], overwrite)
    staged = [os.path.join(os.path.dirname(f) or ".", f".{os.path.basename(f)}.pairing-{os.getpid()}")
              for f in finals]
    stats = []
    try:
        for key, stage in zip(keys, staged):
            stats.append(preprocess(replace(spec, fmt="jsonl", json_key=key), tokenizer, stage, workers=workers,
                                    bos=bos, overwrite=True, progress=progress))
        if stats[0].documents != stats[1].documents:  # records are parsed identically, so never expected
            raise UserError(f"{spec.paths[0]}: {stats[0].documents} '{keys[0]}' documents but {stats[1].documents} "
                            f"'{keys[1]}' documents")
        for stage, final in zip(staged, finals):
            remove_quietly(final + ".idx")  # never an old index beside a new .bin
            os.replace(stage + ".bin", final + ".bin")
            os.replace(stage + ".idx", final + ".idx")
    finally:
        for stage in staged:
            for ext in (".bin", ".idx"):
                remove_quietly(stage + ext)
    return tuple(stats)
