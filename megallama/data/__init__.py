"""Data: tokenizers (SentencePiece, tiktoken, tokenizer.json), Megatron indexed token files, packing, blending, sampling.

Names resolve lazily so that preprocessing workers (spawned processes) import only what they
use - no torch - and start fast.
"""
from importlib import import_module

_EXPORTS = {
    "prepare_data": "prepare", "build_datasets": "prepare", "DataArtifacts": "prepare",
    "MicroBatchIterator": "sampler",
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "IndexedTokens": "indexed", "IndexedWriter": "indexed", "dtype_for_vocab": "indexed",
    "PackedDataset": "packing", "split_ranges": "packing",
    "BlendedDataset": "blending",
    "InputSpec": "records",
    "PreprocessStats": "preprocess",  # the function: megallama.data.preprocess.preprocess
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"megallama.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megallama.data' has no attribute {name!r}")
