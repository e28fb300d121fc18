"""``megallama data-stats PREFIX``: what a ``.bin``/``.idx`` pair holds, after a full check.

With ``--tokenizer`` it also checks that every token id fits the tokenizer's vocabulary (a file
made with another tokenizer fails here rather than as garbage during training).
"""
from __future__ import annotations

NAME = "data-stats"
HELP = "check a Megatron .bin/.idx pair and print its documents, tokens, dtype"


def add_arguments(parser) -> None:
    parser.add_argument("prefix", metavar="PREFIX", help="PREFIX.bin + PREFIX.idx (a .bin/.idx name works too)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tokenizer", metavar="MODEL", help="check ids against this tokenizer file")


def stats(prefix: str, tokenizer: str = None) -> dict:
    import numpy as np

    from megallama.data.indexed import IndexedTokens
    from megallama.errors import UserError

    ids = IndexedTokens(prefix)
    ids.verify()
    lengths = ids.document_lengths
    out = {
        "prefix": ids.prefix, "documents": len(ids), "sequences": ids.num_sequences, "tokens": ids.num_tokens,
        "dtype": ids.dtype.name, "bin_bytes": ids.num_tokens * ids.dtype.itemsize,
        "min_document_tokens": int(lengths.min()) if len(lengths) else 0,
        "max_document_tokens": int(lengths.max()) if len(lengths) else 0,
        "mean_document_tokens": round(float(np.mean(lengths)), 2) if len(lengths) else 0.0,
        "max_token_id": ids.max_token_id(),
    }
    if tokenizer:
        from megallama.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        out["vocab_size"] = tok.vocab_size
        if out["max_token_id"] >= tok.vocab_size:
            raise UserError(f"{ids.bin_path}: token id {out['max_token_id']} is outside the vocabulary of "
                            f"{tok.path} ({tok.vocab_size} tokens); the files were made with another tokenizer")
    return out


def run(args) -> int:
    import json

    out = stats(args.prefix, args.tokenizer)
    if args.json:
        print(json.dumps(out))
    else:
        width = max(map(len, out))
        for key, value in out.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0
