"""Inference: KV caches and TP-aware autoregressive generation (decoder-only and seq2seq)."""
from megallama.inference.generate import GenerationResult, generate, sample_next
from megallama.inference.kv_cache import CrossKVCache, KVCache, make_cross_caches, make_kv_caches
from megallama.inference.seq2seq import generate_seq2seq

__all__ = ["CrossKVCache", "GenerationResult", "KVCache", "generate", "generate_seq2seq", "make_cross_caches",
           "make_kv_caches", "sample_next"]
