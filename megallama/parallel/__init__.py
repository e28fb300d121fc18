"""Megatron-style tensor-parallel building blocks. Nothing here knows about LLaMA."""
from megallama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megallama.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megallama.parallel.mappings import copy_to_tp_region, gather_from_sequence_parallel_region, gather_from_tp_region
from megallama.parallel.random import model_parallel_seed
from megallama.parallel.state import ParallelState, TPGroup, initialize

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "copy_to_tp_region", "gather_from_tp_region", "gather_from_sequence_parallel_region", "model_parallel_seed",
    "ParallelState", "TPGroup", "initialize",
]
