"""The model description the cost models read: LLaMA blocks from our presets, or GPT blocks.

Published throughput figures were measured on GPT models (LayerNorm, 4h GeLU MLP, learned
positions, biases, tied embedding/head), so the cost model must describe those as they were,
beside our LLaMA blocks (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied head). ``ArchSpec`` is
that wider, frozen description; :func:`resolve_model` builds it from ``--model NAME`` or
``--config FILE`` (our run config, or the small ``arch_family:`` schema below).

Schema of an architecture file (``arch_family`` is what marks it)::

    arch_family: gpt            # gpt | llama
    name: megatron-1t           # optional
    dim: 25600
    n_layers: 128
    n_heads: 160
    vocab_size: 51200
    max_seq_len: 2048
    # optional: n_kv_heads, ffn_hidden_size (gpt: 4*dim; llama: Meta's SwiGLU rule with
    # multiple_of / ffn_dim_multiplier), dropout, bias, tied_embeddings, arch
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from megallama.config.layout_rules import ModelShape, padded_vocab
from megallama.config.swiglu import swiglu_hidden
from megallama.errors import UserError, did_you_mean


@dataclass(frozen=True)
class ArchSpec:
    """Everything the FLOP, memory and communication models need to know about a model."""

    name: str
    family: Literal["llama", "gpt"]
    arch: Literal["decoder", "encoder_decoder"]
    dim: int
    n_layers: int            # decoder layers
    n_encoder_layers: int    # 0 for decoder-only
    n_heads: int
    kv_heads: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    dropout: float = 0.0
    bias: bool = False
    tied_embeddings: bool = False
    pad_vocab_to_multiple_of: Optional[int] = None  # Megatron's make-vocab-size-divisible-by
    # encoder-decoder: one token embedding serves encoder and decoder inputs (T5-style)
    shared_enc_dec_embedding: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def tp_view(self, tp: int) -> "ArchSpec":
        """The model as its TP ranks hold it: with fewer KV heads than ranks each head is
        replicated on the ranks whose queries use it (one KV head per rank, as Megatron does), so
        per rank the K/V width is ``max(1, kv_heads / tp)`` heads: counted here as ``max(kv, tp)``
        heads split ``tp`` ways; a padded vocabulary counts its padding. Parameters, saved tensors
        and FLOPs per rank read this view."""
        view = self if self.kv_heads >= tp else replace(self, kv_heads=tp)
        vocab = padded_vocab(self.vocab_size, tp, self.pad_vocab_to_multiple_of)
        return view if vocab == self.vocab_size else replace(view, vocab_size=vocab)

    @property
    def glu(self) -> bool:
        """SwiGLU (three matrices) for LLaMA, a plain 2-matrix GeLU MLP for GPT."""
        return self.family == "llama"

    @property
    def norm_params(self) -> int:
        """RMSNorm has a gain only; LayerNorm a gain and a bias."""
        return self.dim if self.family == "llama" else 2 * self.dim

    @property
    def learned_positions(self) -> bool:
        return self.family == "gpt"

    @property
    def shape(self) -> ModelShape:
        """The dimensions the layout rules read."""
        return ModelShape(n_heads=self.n_heads, n_kv_heads=self.kv_heads, vocab_size=self.vocab_size,
                          ffn_hidden_size=self.ffn_hidden, n_layers=self.n_layers, arch=self.arch,
                          pad_vocab_to_multiple_of=self.pad_vocab_to_multiple_of)

    def with_(self, **changes: Any) -> "ArchSpec":
        return replace(self, **changes)

    @classmethod
    def from_model_config(cls, cfg: Any, name: str = "") -> "ArchSpec":
        """From :class:`megallama.config.ModelConfig` (duck-typed to keep this import-light)."""
        return cls(name=name or "custom", family="llama", arch=cfg.arch, dim=cfg.dim, n_layers=cfg.n_layers,
                   n_encoder_layers=cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0,
                   n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, ffn_hidden=cfg.ffn_hidden_size,
                   vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, dropout=cfg.dropout,
                   tied_embeddings=bool(getattr(cfg, "tie_embeddings", False)),
                   pad_vocab_to_multiple_of=getattr(cfg, "pad_vocab_to_multiple_of", None))


SpecLike = Union[ArchSpec, Any]


def as_spec(model: SpecLike) -> ArchSpec:
    """Accept an ``ArchSpec``, a ``ModelConfig`` or a preset name."""
    if isinstance(model, ArchSpec):
        return model
    if isinstance(model, str):
        from megallama.config import ModelConfig

        return ArchSpec.from_model_config(ModelConfig.preset(model), name=model)
    return ArchSpec.from_model_config(model)


class ArchFile(BaseModel):
    """The ``arch_family:`` YAML schema (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    arch_family: Literal["gpt", "llama"]
    name: Optional[str] = None
    arch: Literal["decoder", "encoder_decoder"] = "decoder"
    dim: int
    n_layers: int
    n_encoder_layers: Optional[int] = None
    n_heads: int
    n_kv_heads: Optional[int] = None
    vocab_size: int
    max_seq_len: int = 2048
    ffn_hidden_size: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    dropout: float = 0.0
    bias: Optional[bool] = None
    tied_embeddings: Optional[bool] = None

    def to_spec(self, default_name: str) -> ArchSpec:
        gpt = self.arch_family == "gpt"
        ffn = self.ffn_hidden_size
        if ffn is None:
            if gpt:
                ffn = 4 * self.dim
            else:
                ffn = swiglu_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        spec = ArchSpec(name=self.name or default_name, family=self.arch_family, arch=self.arch, dim=self.dim,
                        n_layers=self.n_layers,
                        n_encoder_layers=(self.n_encoder_layers or self.n_layers) if self.arch != "decoder" else 0,
                        n_heads=self.n_heads, kv_heads=self.n_kv_heads or self.n_heads, ffn_hidden=ffn,
                        vocab_size=self.vocab_size, max_seq_len=self.max_seq_len, dropout=self.dropout,
                        bias=gpt if self.bias is None else self.bias,
                        tied_embeddings=gpt if self.tied_embeddings is None else self.tied_embeddings)
        check_spec(spec)
        return spec


def check_spec(spec: ArchSpec) -> None:
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
        if getattr(spec, field) <= 0:
            raise UserError(f"model.{field}: expected a positive integer, got {getattr(spec, field)}")
    if spec.dim % spec.n_heads:
        raise UserError(f"model.dim: {spec.dim} is not divisible by n_heads={spec.n_heads}")
    if spec.n_heads % spec.kv_heads:
        raise UserError(f"model.n_kv_heads: {spec.kv_heads} does not divide n_heads={spec.n_heads}")


def load_arch_file(path: Union[str, Path]) -> ArchSpec:
    data = _read_yaml(path)
    for key in data:
        if key not in ArchFile.model_fields:
            raise UserError(f"{path}: unknown key '{key}'{did_you_mean(str(key), ArchFile.model_fields)}")
    try:
        return ArchFile.model_validate(data).to_spec(Path(path).stem)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise UserError(f"{path}: {loc}: {err['msg'].lower()}") from None


def _read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    from megallama.config.bounded_yaml import load_file

    data = load_file(path)  # bounded: size, nesting, alias expansion, integer length
    if not isinstance(data, dict):
        raise UserError(f"config: {path}: expected a mapping at the top level")
    return data


def resolve_model(model: Optional[str], config: Optional[str]) -> Tuple[ArchSpec, Dict[str, Any]]:
    """``--model NAME`` or ``--config FILE`` -> (spec, layout defaults read from a run config).

    A run config (``model: {preset: ...}``, ``parallel:``, ``train:``, ``deepspeed:``) also supplies
    tp/pp/sequence_parallel/ulysses/seq/mbs/recompute/zero/dtype and pipeline-split defaults, and
    whether its attention takes a document mask (``masked``) and its checkpoints are partitioned, so
    ``estimate --config run.yaml`` costs the run as configured; command-line flags override them.
    """
    if (model is None) == (config is None):
        raise UserError("give exactly one of --model NAME or --config FILE")
    if model is not None:
        return as_spec(model), {}
    data = _read_yaml(config)
    if "arch_family" in data:
        return load_arch_file(config), {}
    from megallama.config import load_run_config

    run = load_run_config(config)
    from megallama.train.ds_settings import DeepSpeedSettings

    ds = DeepSpeedSettings.of(run.deepspeed)
    defaults = dict(tp=run.parallel.tp, pp=run.parallel.pp, sp=run.parallel.sequence_parallel,
                    ulysses=run.parallel.ulysses,
                    seq=run.train.seq_len,
                    # auto: chosen by train for its device; here the command's own choice stands
                    **({} if run.train.micro_batch_size == "auto" else {"mbs": run.train.micro_batch_size}),
                    recompute=run.train.activation_checkpointing.mode, zero=ds.zero_stage,
                    dtype=ds.precision, offload=ds.offload_optimizer is not None,
                    pipeline_partition=run.parallel.pipeline_partition,
                    pipeline_layers=run.parallel.pipeline_layers,
                    # what the run's blocks save beyond the layout (compare.impl_of's rule)
                    masked=bool(run.data.document_mask),
                    partition_activations=run.train.activation_checkpointing.partition_activations)
    return ArchSpec.from_model_config(run.model, name=Path(config).stem), defaults
