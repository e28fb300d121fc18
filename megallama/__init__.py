"""megallama: LLaMA-family training on Megatron-style tensor parallelism, driven by DeepSpeed."""
from megallama.config import ModelConfig, RunConfig, load_run_config

__version__ = "0.1.0"

_LAZY = {
    "LlamaForCausalLM": "megallama.model",
    "LlamaEncoderDecoder": "megallama.model",
    "LlamaForSequenceClassification": "megallama.model",
    "build_model": "megallama.model",
    "from_pretrained": "megallama.checkpoint.pretrained",
}


def __getattr__(name):  # torch-heavy modules load on first use, keeping `megallama --help` fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megallama' has no attribute {name!r}")


__all__ = ["ModelConfig", "RunConfig", "load_run_config", *_LAZY]
