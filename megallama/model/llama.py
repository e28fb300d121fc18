"""LLaMA models on parallel layers: causal LM, encoder-decoder, and sequence classification.

Parameter names follow Meta's release (``tok_embeddings``, ``layers.N.attention.*``, ``norm``,
``output``) with Q/K/V fused as ``wqkv`` and W1/W3 as ``w13``; with ``tie_embeddings`` there is no
``output``: the token embedding's one weight is also the LM head. The model holds no parallelism
plan: it is built for the :class:`ParallelState` it is given (kept as ``parallel_state``), and
:func:`build_model` is the one place a single-process layout is assumed when none is given.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from megallama.config import ModelConfig
from megallama.model.attention import build_mask
from megallama.model.blocks import TransformerBlock, init_module, residual_dropout
from megallama.model.norm import RMSNorm
from megallama.model.rope import RotaryEmbedding
from megallama.parallel import (ColumnParallelLinear, ParallelState, TPGroup, VocabParallelEmbedding,
                                gather_from_sequence_parallel_region, gather_from_tp_region,
                                vocab_parallel_cross_entropy)
from megallama.parallel import ulysses
from megallama.parallel.layers import mask_padded_logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp: TPGroup, ignore_index: int = -100,
                   sequence: TPGroup = TPGroup()) -> torch.Tensor:
    """Mean next-token loss over non-ignored labels; ``logits`` may be this rank's vocab slice of
    ``tp`` and, under Ulysses, this rank's shard of the whole ``labels`` (``sequence``)."""
    labels = ulysses.shard(labels, sequence)
    per_token = vocab_parallel_cross_entropy(logits, labels, tp, ignore_index)
    return ulysses.sequence_mean(per_token.sum(), (labels != ignore_index).sum(), sequence)


def lm_head_logits(head: nn.Module, h: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """This rank's vocab slice of the logits from the output layer or, tied, the token embedding,
    with any vocabulary padding masked out."""
    logits = head.lm_logits(h) if isinstance(head, VocabParallelEmbedding) else head(h)
    return mask_padded_logits(logits, vocab_size, tp)


def full_logits(local: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """``[..., vocab]`` logits from every rank's slice (vocabulary padding dropped)."""
    logits = gather_from_tp_region(local, tp)
    return logits if logits.size(-1) == vocab_size else logits[..., :vocab_size]


class LlamaDecoder(nn.Module):
    """Embedding, causal blocks and the final norm: the trunk every decoder head sits on."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, seed: Optional[int] = 0, device=None, dtype=None):
        super().__init__()
        cfg.check()
        self.config = cfg
        self.parallel_state = state
        kw = dict(device=device, dtype=dtype)
        self.tok_embeddings = VocabParallelEmbedding(state, cfg.vocab_size, cfg.dim, init_std=cfg.init_std,
                                                     pad_multiple=cfg.pad_vocab_to_multiple_of, **kw)
        self.layers = nn.ModuleList(self._make_layers(cfg, kw))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, sp_group=state.sp_group, **kw)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self._build_head(cfg, kw)
        self.init_weights(seed)

    def _make_layers(self, cfg: ModelConfig, kw) -> List[nn.Module]:
        return [TransformerBlock(cfg, self.parallel_state, i, causal=True, **kw) for i in range(cfg.n_layers)]

    def _build_head(self, cfg: ModelConfig, kw) -> None:
        pass

    def _build_lm_head(self, cfg: ModelConfig, kw) -> None:
        """An ``output`` layer, unless tied: then the token embedding serves (:meth:`lm_logits`)."""
        if not cfg.tie_embeddings:
            self.output = ColumnParallelLinear(self.parallel_state, cfg.dim, cfg.vocab_size, init_std=cfg.init_std,
                                               pad_multiple=cfg.pad_vocab_to_multiple_of, **kw)

    @property
    def lm_head(self) -> nn.Module:
        return self.tok_embeddings if self.config.tie_embeddings else self.output

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(self.lm_head, h, self.config.vocab_size, self.parallel_state.tensor_parallel)

    def init_parts(self):
        """``(module, key)`` pairs, each initialised from its own keyed generator, so weights do
        not depend on the layout (and ZeRO-3 can gather one part at a time to initialise it)."""
        for name, child in self.named_children():
            if name in ("layers", "encoder_layers"):
                for layer in child:
                    yield layer, f"{name}.{layer.layer_id}"
            elif any(True for _ in child.parameters()):
                yield child, name

    def init_weights(self, seed: Optional[int]) -> None:
        if seed is None:  # the caller initialises (e.g. under ZeRO-3, gathering each part)
            return
        for part, key in self.init_parts():
            init_module(part, seed, key)

    def hidden_states(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      start_pos: int = 0, kv_caches=None, document_ids: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``document_ids``/``position_ids [b, s]``: packed documents attend within themselves, at
        the given RoPE positions (training rows: no ``start_pos``, no caches). Under Ulysses every
        argument covers the whole sequence and the result is this rank's shard of it."""
        group = self.parallel_state.ulysses_parallel
        seq = tokens.size(1)
        mask = build_mask(seq, start_pos + seq, True, attention_mask, tokens.device, document_ids=document_ids)
        if group.size > 1:
            if start_pos or kv_caches:
                raise ValueError("Ulysses sequence parallelism trains and scores whole sequences (no KV cache)")
            position_ids = ulysses.positions(tokens, group, position_ids)
            tokens = ulysses.shard(tokens, group)
        h = residual_dropout(self.tok_embeddings(tokens), self.config.dropout, self.training, self.parallel_state)
        rope = self.rope if position_ids is None else self.rope.at(position_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, start_pos=start_pos, kv_cache=kv_caches[i] if kv_caches else None)
        return self.norm(h)


class LlamaForCausalLM(LlamaDecoder):
    """``model(tokens)`` -> full logits ``[b, s, vocab]``; ``model(tokens, labels)`` -> mean loss
    computed on vocab-parallel logits without gathering them."""

    def _build_head(self, cfg: ModelConfig, kw) -> None:
        self._build_lm_head(cfg, kw)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, start_pos: int = 0, kv_caches=None,
                document_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None):
        logits = self.lm_logits(self.hidden_states(tokens, attention_mask, start_pos, kv_caches, document_ids,
                                                   position_ids))
        state = self.parallel_state
        if labels is not None:
            return causal_lm_loss(logits, labels, state.tensor_parallel, sequence=state.ulysses_parallel)
        logits = full_logits(logits, self.config.vocab_size, state.tensor_parallel)
        return ulysses.gather_sequence(logits, state.ulysses_parallel) if state.ulysses > 1 else logits


class LlamaForSequenceClassification(LlamaDecoder):
    """A task head (``score``) on the last non-padding position of a pre-trained trunk."""

    def _build_head(self, cfg: ModelConfig, kw) -> None:
        self.score = nn.Linear(cfg.dim, cfg.num_labels, bias=False, **kw)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None):
        if self.parallel_state.ulysses > 1:
            raise ValueError("sequence classification reads the last token of the whole sequence: no Ulysses")
        h = self.hidden_states(tokens, attention_mask)
        if self.parallel_state.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, self.parallel_state.tensor_parallel, reduce_grads=False)
        if attention_mask is None:
            last = torch.full((tokens.size(0),), tokens.size(1) - 1, device=tokens.device)
        else:
            last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
        logits = self.score(h[torch.arange(tokens.size(0), device=tokens.device), last])
        if labels is not None:
            return nn.functional.cross_entropy(logits.float(), labels)
        return logits


class LlamaEncoderDecoder(LlamaDecoder):
    """The seed's encoder-decoder: bidirectional encoder, decoder with cross-attention to it,
    one shared token embedding, an LM head (tied to that embedding with ``tie_embeddings``).

    ``model(src, tgt, labels, src_mask)`` trains; inference encodes once (:meth:`encode`) and
    then calls :meth:`decode` per step with self-attention K/V caches and cross-attention
    caches that hold the memory's K/V after the first step."""

    def _make_layers(self, cfg: ModelConfig, kw) -> List[nn.Module]:
        if cfg.arch != "encoder_decoder":
            raise ValueError("LlamaEncoderDecoder needs model.arch = 'encoder_decoder'")
        state = self.parallel_state
        self.encoder_layers = nn.ModuleList(
            TransformerBlock(cfg, state, i, causal=False, **kw) for i in range(cfg.encoder_layers))
        self.encoder_norm = RMSNorm(cfg.dim, cfg.norm_eps, sp_group=state.sp_group, **kw)
        return [TransformerBlock(cfg, state, i, causal=True, cross_attention=True, **kw) for i in range(cfg.n_layers)]

    def _build_head(self, cfg: ModelConfig, kw) -> None:
        self._build_lm_head(cfg, kw)

    def encode(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder memory ``[b, s_src, dim]`` (sequence-sharded under sequence parallelism)."""
        h = residual_dropout(self.tok_embeddings(src), self.config.dropout, self.training, self.parallel_state)
        mask = build_mask(src.size(1), src.size(1), False, src_mask, src.device)
        for layer in self.encoder_layers:
            h = layer(h, self.rope, mask)
        return self.encoder_norm(h)

    def _decode(self, tgt, memory, src_mask, start_pos: int = 0, kv_caches=None, cross_caches=None):
        """This rank's vocab slice of the decoder logits."""
        h = residual_dropout(self.tok_embeddings(tgt), self.config.dropout, self.training, self.parallel_state)
        q_len = tgt.size(1)
        self_mask = build_mask(q_len, start_pos + q_len, True, None, tgt.device)
        cross_mask = None
        if src_mask is not None:
            cross_mask = build_mask(q_len, src_mask.size(1), False, src_mask, tgt.device, self_attention=False)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope, self_mask, memory=memory, memory_mask=cross_mask, start_pos=start_pos,
                      kv_cache=kv_caches[i] if kv_caches else None,
                      cross_cache=cross_caches[i] if cross_caches else None)
        return self.lm_logits(self.norm(h))

    def decode(self, tgt: torch.Tensor, memory: Optional[torch.Tensor], src_mask: Optional[torch.Tensor] = None,
               start_pos: int = 0, kv_caches=None, cross_caches=None) -> torch.Tensor:
        """Full logits ``[b, s_tgt, vocab]`` of decoder tokens at ``start_pos``; ``memory`` may be
        None once ``cross_caches`` are filled."""
        return full_logits(self._decode(tgt, memory, src_mask, start_pos, kv_caches, cross_caches),
                           self.config.vocab_size, self.parallel_state.tensor_parallel)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, labels: Optional[torch.Tensor] = None,
                src_mask: Optional[torch.Tensor] = None):
        """Targets are right-padded, so the causal mask alone keeps padding out of every real
        position; ``labels`` carry -100 there."""
        logits = self._decode(tgt, self.encode(src, src_mask), src_mask)
        tp = self.parallel_state.tensor_parallel
        if labels is not None:
            return causal_lm_loss(logits, labels, tp)
        return full_logits(logits, self.config.vocab_size, tp)


def build_model(cfg: ModelConfig, state: Optional[ParallelState] = None, seed: Optional[int] = 0, device=None,
                dtype=None) -> nn.Module:
    """The language model ``cfg.arch`` names, built for ``state`` (one process when None)."""
    cls = LlamaEncoderDecoder if cfg.arch == "encoder_decoder" else LlamaForCausalLM
    return cls(cfg, state or ParallelState(), seed=seed, device=device, dtype=dtype)
