"""Inference: a KV cache and TP-aware autoregressive generation."""
from megallama.inference.generate import GenerationResult, generate, sample_next
from megallama.inference.kv_cache import KVCache, make_kv_caches

__all__ = ["GenerationResult", "KVCache", "generate", "make_kv_caches", "sample_next"]
