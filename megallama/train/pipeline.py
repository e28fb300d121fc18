"""The decoder as a DeepSpeed ``PipelineModule``, cut from the model itself.

The model is built once on the meta device (nothing allocated); its embedding, blocks, final
norm and head become the pipeline's layers through thin adapters that keep each part under its
canonical name (``tok_embeddings``, ``layers.N.…``, ``norm``, ``output``), and every block
shares the model's one RoPE table. A layer is allocated and initialised from the part's keyed
seed only on the stage that owns it, so a PP=2 run starts from exactly the PP=1 weights.
DeepSpeed files each layer under its index (``N.`` in parameter names, ``layer_NN`` files);
the names under that index are the model's own.

Packed documents (``data.document_mask``) enter as ``(tokens, document ids[, positions])`` and
every stage passes the integer tensors on beside the activations (DeepSpeed sends tuples; only
floating-point members carry gradients), so each block builds its document mask where it runs.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from megallama.config import ModelConfig
from megallama.model import build_model, causal_lm_loss
from megallama.model.attention import build_mask
from megallama.model.blocks import init_module, residual_dropout
from megallama.parallel import ParallelState
from megallama.train.step import IGNORE


class EmbeddingStage(nn.Module):
    """The model's token embedding and the dropout after it: the first pipeline layer."""

    def __init__(self, tok_embeddings: nn.Module, dropout: float, state: ParallelState):
        super().__init__()
        self.tok_embeddings, self.dropout, self.parallel_state = tok_embeddings, dropout, state

    def forward(self, tokens):
        tokens, *documents = tokens if isinstance(tokens, tuple) else (tokens,)
        h = residual_dropout(self.tok_embeddings(tokens), self.dropout, self.training, self.parallel_state)
        return (h, *documents) if documents else h


class BlockStage(nn.Module):
    """One of the model's blocks, held as ``layers.N`` so its names are the model's."""

    def __init__(self, block: nn.Module, rope: nn.Module):
        super().__init__()
        self.layers = nn.ModuleDict({str(block.layer_id): block})
        self.rope = rope  # the model's table, shared by every block (it holds no state)

    def forward(self, h):
        (block,) = self.layers.values()
        if not isinstance(h, tuple):
            return block(h, self.rope)
        h, docs, *positions = h  # a mask per block: O(s^2) compares, small beside the attention itself
        seq = docs.size(1)  # the whole sequence (h holds 1/tp of it under sequence parallelism)
        mask = build_mask(seq, seq, True, None, h.device, document_ids=docs)
        rope = self.rope.at(positions[0]) if positions else self.rope
        return (block(h, rope, mask), docs, *positions)


class HeadStage(nn.Module):
    """The model's final norm and output head: this rank's vocab slice of the logits (the loss
    never gathers it)."""

    def __init__(self, norm: nn.Module, output: nn.Module):
        super().__init__()
        self.norm, self.output = norm, output

    def forward(self, h) -> torch.Tensor:
        h = h[0] if isinstance(h, tuple) else h  # packed documents' ids end here
        return self.output(self.norm(h))


class PipelineLoss:
    """The last stage's loss: a micro-batch's token mean or, while a training step sets ``scale``
    (:func:`megallama.train.step.token_weighting`), that mean times the micro-batch's valid labels
    times ``scale``, so DeepSpeed's mean over micro-batches and DP is the global batch's token mean."""

    def __init__(self, tp):
        self.tp, self.scale = tp, None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = causal_lm_loss(logits, labels, self.tp)
        return loss if self.scale is None else loss * ((labels != IGNORE).sum() * self.scale)


Layer = Tuple[type, Dict[str, Any]]


def _layers(model: nn.Module) -> List[Layer]:
    """The model's parts in pipeline order, each with the adapter that runs it."""
    out: List[Layer] = [(EmbeddingStage, dict(tok_embeddings=model.tok_embeddings, dropout=model.config.dropout,
                                         state=model.parallel_state))]
    out += [(BlockStage, dict(block=block, rope=model.rope)) for block in model.layers]
    out.append((HeadStage, dict(norm=model.norm, output=model.output)))
    return out


def _meta_model(cfg: ModelConfig, state: ParallelState) -> nn.Module:
    with torch.device("meta"):
        return build_model(cfg, state, seed=None)


def _materialise(part: nn.Module, seed: int, key: str, state: ParallelState) -> nn.Module:
    """A copy of meta-device ``part`` with storage, initialised from ``key``'s seed (the model's
    own keyed initialisation); parameters keep their TP marks, which copying drops. The copy
    shares the layout (its groups cannot be copied, and its RNG tracker is swapped later)."""
    memo = {id(x): x for x in (state, state.rng, state.tp_group, state.dp_group, state.pp_group) if x is not None}
    real = copy.deepcopy(part, memo).to_empty(device=torch.get_default_device())
    for meta_p, p in zip(part.parameters(), real.parameters()):
        p.__dict__.update(meta_p.__dict__)
    init_module(real, seed, key)
    return real


def _spec(stage: type, args: Dict[str, Any], keys: Dict[int, str], seed: int, state: ParallelState):
    """A DeepSpeed layer spec whose parts are allocated and initialised only when DeepSpeed builds
    it: on the stage that owns it (and, to balance stages by parameters, one at a time to count)."""
    from deepspeed.pipe import LayerSpec

    def build(log=False):
        return stage(**{k: _materialise(v, seed, keys[id(v)], state) if id(v) in keys else v
                        for k, v in args.items()})

    spec = LayerSpec(stage)
    spec.build = build
    return spec


def build_pipeline_module(cfg: ModelConfig, state: ParallelState, seed: int, partition: str):
    """This rank's stage of the decoder; ``partition``: ``parameters`` or ``uniform`` (blocks)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    model = _meta_model(cfg, state)
    keys = {id(part): key for part, key in model.init_parts()}
    specs = [_spec(stage, args, keys, seed, state) for stage, args in _layers(model)]
    topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)
    tp = state.tensor_parallel
    return PipelineModule(layers=specs, loss_fn=PipelineLoss(tp),
                          topology=topology,
                          partition_method="parameters" if partition == "parameters" else "type:BlockStage")


def stage_of_parameters(cfg: ModelConfig, pp: int) -> Dict[str, int]:
    """Canonical name -> the stage of ``pp`` that holds it when blocks are spread evenly (the
    ``uniform`` partition: the embedding rides with the first blocks, the head with the last)."""
    layers = [stage(**args) for stage, args in _layers(_meta_model(cfg, ParallelState()))]
    blocks = sum(isinstance(layer, BlockStage) for layer in layers)
    out, seen = {}, 0
    for layer in layers:
        out.update({name: min(seen * pp // blocks, pp - 1) for name, _ in layer.named_parameters()})
        seen += isinstance(layer, BlockStage)
    return out
