"""Shapes and counts of a model at a TP degree, read off a meta-device build (nothing allocated)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from megallama.config import ModelConfig
from megallama.config.layout_rules import kv_replicas
from megallama.config.pipeline_split import describe_split
from megallama.model.llama import build_model
from megallama.model.norm import RMSNorm
from megallama.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding
from megallama.parallel.layers import logical_shape


def _rows(module: torch.nn.Module, prefix: str, tp: int) -> List[Dict[str, Any]]:
    rows = []
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, ColumnParallelLinear):
            parent = name.rsplit(".", 1)[0]
            names = [f"{parent}.{part}" for part in m.part_names] if m.part_names else [name]
            heads_of = m.fused_heads or [None] * len(m.fused_sizes)
            for part, size, local, heads in zip(names, m.fused_sizes, m.local_sizes, heads_of):
                rep = kv_replicas(heads, tp) if heads else 1
                shared = f" (each head on {rep} ranks)" if rep > 1 else ""
                rows.append(dict(name=part, parallel="column" + shared,
                                 full_shape=[m.in_features, size], rank_shape=[m.in_features, local],
                                 fused_into=name if len(m.fused_sizes) > 1 else None))
        elif isinstance(m, RowParallelLinear):
            rows.append(dict(name=name, parallel="row", full_shape=[m.in_features, m.out_features],
                             rank_shape=[m.in_features // tp, m.out_features], fused_into=None))
        elif isinstance(m, VocabParallelEmbedding):
            rows.append(dict(name=name, parallel="vocab", full_shape=[m.num_embeddings, m.embedding_dim],
                             rank_shape=[m.local_vocab, m.embedding_dim], fused_into=None))
        elif isinstance(m, RMSNorm):
            rows.append(dict(name=name, parallel="replicated", full_shape=[m.weight.numel()],
                             rank_shape=[m.weight.numel()], fused_into=None))
    return rows


def _stages(model: torch.nn.Module, stage_layers: Sequence[int]) -> List[Dict[str, int]]:
    """Blocks and parameters per rank of each pipeline stage, as training's pipeline places them."""
    from megallama.train.pipeline import stage_parameters

    return [dict(stage=i, layers=n, parameters_per_rank=sum(p.numel() for p in params.values()))
            for i, (n, params) in enumerate(zip(stage_layers, stage_parameters(model, stage_layers)))]


def _tied_row(model: torch.nn.Module) -> List[Dict[str, Any]]:
    emb = model.tok_embeddings
    return [dict(name="output", parallel="column, tied: tok_embeddings", full_shape=[emb.embedding_dim,
                 emb.num_embeddings], rank_shape=[emb.embedding_dim, emb.local_vocab], fused_into=None)]


def describe(cfg: ModelConfig, tp: int = 1, stage_layers: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Per-layer weight table (math convention: ``x @ W`` with W as in x out) and totals (a tied
    embedding counted once, vocabulary padding only in the per-rank count); with ``stage_layers``
    (blocks per pipeline stage) each stage's share and the heaviest stage."""
    with torch.device("meta"):
        model = build_model(cfg, ParallelState(tp=tp))
        total = sum(math.prod(logical_shape(p)) for p in model.parameters())
    per_rank = sum(p.numel() for p in model.parameters())  # built at tp: local shapes already
    info = dict(
        arch=cfg.arch, tp=tp, parameters=total, parameters_per_rank=per_rank,
        ffn_hidden_size=cfg.ffn_hidden_size, head_dim=cfg.head_dim, n_layers=cfg.n_layers,
        layer=_rows(model.layers[0], "layers.0", tp),
        other=_rows(model.tok_embeddings, "tok_embeddings", tp) + _rows(model.norm, "norm", tp)
        + (_rows(model.output, "output", tp) if hasattr(model, "output") else _tied_row(model)),
    )
    if stage_layers is not None:
        stages = _stages(model, stage_layers)
        heaviest = max(stages, key=lambda s: s["parameters_per_rank"])
        info.update(pp=len(stages), stage_split=describe_split(stage_layers), stages=stages, heaviest_stage=heaviest)
    return info
