"""The model section (``ModelConfig``: Meta's ``ModelArgs`` plus ``arch``) and its shipped presets."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional

import yaml
from pydantic import model_validator

from megallama.config.fields import MAX_SIZE, PRESET_DIR, ConfigError, Float, Int, _int, _num, _Strict
from megallama.config.layout_rules import ModelShape
from megallama.config.pipeline_split import StageWeights
from megallama.config.swiglu import swiglu_hidden
from megallama.errors import did_you_mean


class RopeScaling(_Strict):
    """Llama 3.1's RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``): long
    wavelengths divided by ``factor``, short ones kept, the band between interpolated."""

    type: Literal["llama3"] = "llama3"
    factor: Float = _num(8.0, gt=0)
    low_freq_factor: Float = _num(1.0, gt=0)
    high_freq_factor: Float = _num(4.0, gt=0)
    original_max_seq_len: Int = _int(8192)

    @model_validator(mode="after")
    def _band(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor: {self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor}")
        return self


class ModelConfig(_Strict):
    """Architecture, named after Meta's ``ModelArgs`` plus ``arch``."""

    arch: Literal["decoder", "encoder_decoder"] = "decoder"
    dim: Int = 4096
    n_layers: Int = 32
    n_encoder_layers: Optional[Int] = None  # encoder_decoder only; defaults to n_layers
    n_heads: Int = 32
    n_kv_heads: Optional[Int] = None
    vocab_size: Int = 32000
    multiple_of: Int = 256
    ffn_dim_multiplier: Optional[Float] = None
    norm_eps: Float = 1e-5
    rope_theta: Float = 10000.0
    max_seq_len: Int = 2048
    dropout: Float = 0.0
    init_std: Float = 0.02
    num_labels: Int = 2  # classification head (fine-tuning) only
    rope_scaling: Optional[RopeScaling] = None  # Llama 3.1's long-context frequency scaling
    tie_embeddings: bool = False  # the output head reuses the token embedding (Llama 3.2 1B/3B)
    # Megatron's make-vocab-size-divisible-by: at TP t the vocabulary is padded to the next multiple
    # of (this x t); the padding never reaches the loss, sampling, layout-free checkpoints or exports
    pad_vocab_to_multiple_of: Optional[Int] = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: 2/3 of 4d, scaled, rounded up to ``multiple_of`` (Meta's rule)."""
        return swiglu_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def shape(self) -> ModelShape:
        """The dimensions the layout rules read."""
        return ModelShape(n_heads=self.n_heads, n_kv_heads=self.kv_heads, vocab_size=self.vocab_size,
                          ffn_hidden_size=self.ffn_hidden_size, n_layers=self.n_layers, arch=self.arch,
                          pad_vocab_to_multiple_of=self.pad_vocab_to_multiple_of)

    def pipeline_weights(self) -> StageWeights:
        """Parameters of one block, and of what the first and last pipeline stages hold besides."""
        d, hd = self.dim, self.head_dim
        block = d * hd * (self.n_heads + 2 * self.kv_heads) + d * d + 3 * d * self.ffn_hidden_size + 2 * d
        embed = self.vocab_size * d
        return StageWeights(block=block, first=embed, last=embed + d)

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layers if self.n_encoder_layers is not None else self.n_layers

    def check(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if not 0 < getattr(self, name) <= MAX_SIZE:
                raise ConfigError(f"model.{name}: expected a positive integer up to {MAX_SIZE}, "
                                  f"got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim: {self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise ConfigError(f"model.n_kv_heads: expected a positive integer, got {self.n_kv_heads}")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads: {self.kv_heads} must be positive and divide model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.dim: head size {self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a value in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"model.{name}: expected a positive number, got {getattr(self, name)}")
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise ConfigError(f"model.init_std: expected a non-negative number, got {self.init_std}")
        if self.ffn_dim_multiplier is not None and not (math.isfinite(self.ffn_dim_multiplier)
                                                        and self.ffn_dim_multiplier > 0):
            raise ConfigError(f"model.ffn_dim_multiplier: expected a positive number, got {self.ffn_dim_multiplier}")
        if not 0 < self.ffn_hidden_size <= MAX_SIZE:
            raise ConfigError(f"model.ffn_dim_multiplier: gives an FFN width of {self.ffn_hidden_size}, "
                              f"expected 1 to {MAX_SIZE}")
        if self.n_encoder_layers is not None and not 0 < self.n_encoder_layers <= MAX_SIZE:
            raise ConfigError(f"model.n_encoder_layers: expected a positive integer up to {MAX_SIZE}, "
                              f"got {self.n_encoder_layers}")
        if self.pad_vocab_to_multiple_of is not None and not 0 < self.pad_vocab_to_multiple_of <= 65536:
            raise ConfigError(f"model.pad_vocab_to_multiple_of: expected a positive integer up to 65536 or null, "
                              f"got {self.pad_vocab_to_multiple_of}")
        if not 0 < self.num_labels <= MAX_SIZE:
            raise ConfigError(f"model.num_labels: expected a positive integer up to {MAX_SIZE}, got {self.num_labels}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A shipped preset (``tiny``, ``llama-7b``, ...) with optional field overrides."""
        from megallama.config.loading import build_section

        return build_section(cls, {**load_preset(name), **overrides}, "model")


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> Dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if name not in preset_names():  # a name, never a path outside the package
        raise ConfigError(f"model.preset: unknown preset '{name}'{did_you_mean(name, preset_names())}"
                          f" (available: {', '.join(preset_names())})")
    return yaml.safe_load(path.read_text()) or {}
