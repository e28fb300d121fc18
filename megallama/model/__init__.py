"""LLaMA model definitions (no knowledge of DeepSpeed or of any parallelism plan)."""
from megallama.model.llama import (LlamaDecoder, LlamaEncoderDecoder, LlamaForCausalLM,
                                   LlamaForSequenceClassification, build_model, causal_lm_loss)
from megallama.model.norm import RMSNorm, rmsnorm_backend
from megallama.model.rope import RotaryEmbedding

__all__ = ["LlamaDecoder", "LlamaForCausalLM", "LlamaEncoderDecoder", "LlamaForSequenceClassification",
           "build_model", "causal_lm_loss", "RMSNorm", "RotaryEmbedding", "rmsnorm_backend"]
