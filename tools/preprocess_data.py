#!/usr/bin/env python3
"""Tokenize text/JSONL into Megatron .bin/.idx files: ``megallama preprocess`` as a script.

Example::

    python tools/preprocess_data.py --input corpus.jsonl --json-key text \\
        --tokenizer tokenizer.model --output-prefix data/corpus --workers 8
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
