"""The decoder as a DeepSpeed ``PipelineModule``, cut from the model itself.

The model is built once on the meta device (nothing allocated); its embedding, blocks, final
norm and head become the pipeline's layers through thin adapters that keep each part under its
canonical name (``tok_embeddings``, ``layers.N.…``, ``norm``, ``output``), and every block
shares the model's one RoPE table. A layer is allocated and initialised from the part's keyed
seed only on the stage that owns it, so a PP=2 run starts from exactly the PP=1 weights.
DeepSpeed files each layer under its index (``N.`` in parameter names, ``layer_NN`` files);
the names under that index are the model's own. Each stage holds the blocks the run's split gives
it (``RunConfig.stage_layers()``, any sizes); checkpoints group parameters by the same bounds.
A tied model's first and last stages each hold the token embedding as DeepSpeed tied layers (one
key), so DeepSpeed broadcasts it from the first stage at start and all-reduces its gradients
between the two; layout-free checkpoints keep the first stage's (the last stage's is marked
``ds_pipe_replicated``).

Packed documents (``data.document_mask``) enter as ``(tokens, document ids[, positions])`` and
every stage passes the integer tensors on beside the activations (DeepSpeed sends tuples; only
floating-point members carry gradients), so each block builds its document mask where it runs.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from megallama.config import ModelConfig
from megallama.model import build_model, causal_lm_loss
from megallama.model.attention import build_mask
from megallama.model.blocks import init_module, residual_dropout
from megallama.model.llama import lm_head_logits
from megallama.parallel import ParallelState, VocabParallelEmbedding
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
    """The model's final norm and LM head (``output``, or tied: ``tok_embeddings``): this rank's
    vocab slice of the logits, padding masked (the loss never gathers it)."""

    def __init__(self, norm: nn.Module, head: nn.Module, vocab_size: int, state: ParallelState):
        super().__init__()
        self.norm, self.vocab_size, self.tp = norm, vocab_size, state.tensor_parallel
        self.tied = isinstance(head, VocabParallelEmbedding)
        setattr(self, "tok_embeddings" if self.tied else "output", head)

    def forward(self, h) -> torch.Tensor:
        h = h[0] if isinstance(h, tuple) else h  # packed documents' ids end here
        head = self.tok_embeddings if self.tied else self.output
        return lm_head_logits(head, self.norm(h), self.vocab_size, self.tp)


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
    out.append((HeadStage, dict(norm=model.norm, head=model.lm_head, vocab_size=model.config.vocab_size,
                                state=model.parallel_state)))
    return out


TIED_KEY = "tok_embeddings"  # DeepSpeed's key for the embedding the first and last stages share


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


def _spec(stage: type, args: Dict[str, Any], keys: Dict[int, str], seed: int, state: ParallelState,
          tied: bool = False):
    """A DeepSpeed layer spec whose parts are allocated and initialised only when DeepSpeed builds
    it: on the stage that owns it (and, to balance stages by parameters, one at a time to count).
    ``tied``: a layer holding the shared token embedding (see the module docstring)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    def build(log=False):
        return stage(**{k: _materialise(v, seed, keys[id(v)], state) if id(v) in keys else v
                        for k, v in args.items()})

    spec = TiedLayerSpec(TIED_KEY, stage, tied_weight_attr=["tok_embeddings.weight"]) if tied else LayerSpec(stage)
    spec.build = build
    return spec


def _stage_bounds(layers: List[Layer], stage_layers: Sequence[int]) -> List[int]:
    """DeepSpeed's ``parts`` (stage ``s`` runs layers ``parts[s]:parts[s + 1]``) for
    ``stage_layers`` blocks per stage: what precedes the first block (the embedding) joins the
    first stage, what follows the last (the head) joins the last."""
    blocks = [i for i, (stage, _) in enumerate(layers) if stage is BlockStage]
    if sum(stage_layers) != len(blocks) or min(stage_layers, default=0) < 1:
        raise ValueError(f"stage layers {list(stage_layers)} do not split the model's {len(blocks)} blocks")
    bounds, seen = [0], 0
    for count in stage_layers[:-1]:
        seen += count
        bounds.append(blocks[seen])
    return bounds + [len(layers)]


@functools.lru_cache(maxsize=None)
def _staged_pipeline_module():
    """The class, defined once DeepSpeed is imported (the module itself does not import it)."""
    from deepspeed.pipe import PipelineModule

    class StagedPipelineModule(PipelineModule):
        """DeepSpeed's pipeline with the stage boundaries given (``pipeline_split``'s rule), not
        found by one of its own partition methods, which balance differently or not at all."""

        def __init__(self, layers, bounds: List[int], **kwargs):
            self._megallama_bounds = list(bounds)  # read by _partition_layers during __init__
            super().__init__(layers=layers, **kwargs)

        def _partition_layers(self, method=None):
            self.parts = list(self._megallama_bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return StagedPipelineModule


def build_pipeline_module(cfg: ModelConfig, state: ParallelState, seed: int, stage_layers: Sequence[int]):
    """This rank's stage of the decoder; ``stage_layers``: blocks per stage (``RunConfig.stage_layers()``)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if len(stage_layers) != state.pp:
        raise ValueError(f"stage layers {list(stage_layers)} name {len(stage_layers)} stages, the layout has {state.pp}")
    model = _meta_model(cfg, state)
    keys = {id(part): key for part, key in model.init_parts()}
    layers = _layers(model)
    tied = cfg.tie_embeddings
    specs = [_spec(stage, args, keys, seed, state, tied=tied and i in (0, len(layers) - 1))
             for i, (stage, args) in enumerate(layers)]
    topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)
    tp = state.tensor_parallel
    module = _staged_pipeline_module()(layers=specs, bounds=_stage_bounds(layers, stage_layers),
                                       loss_fn=PipelineLoss(tp), topology=topology)
    _only_tied_weights_replicated(module)
    return module


def _only_tied_weights_replicated(module) -> None:
    """DeepSpeed marks every parameter of a later stage's tied layer ``ds_pipe_replicated`` (left
    out of the gradient norm, and of our layout-free save); the last stage's head layer also holds
    the final norm, which is its own: only the tied weight is a copy."""
    for comm in module.tied_comms.values():
        tied = {id(module._recursive_getattr(comm["module"], attr)) for attr in comm["weight_attr"]}
        for p in comm["module"].parameters():
            if getattr(p, "ds_pipe_replicated", False) and id(p) not in tied:
                p.ds_pipe_replicated = False


def stage_parameters(model: nn.Module, stage_layers: Sequence[int]) -> List[Dict[str, nn.Parameter]]:
    """Each stage's parameters by canonical name, as a pipeline cut from ``model`` with
    ``stage_layers`` blocks per stage holds them (the bounds training uses)."""
    layers = _layers(model)
    bounds = _stage_bounds(layers, stage_layers)
    return [{name: p for cls, args in layers[bounds[s]:bounds[s + 1]] for name, p in cls(**args).named_parameters()}
            for s in range(len(stage_layers))]


def stage_of_parameters(cfg: ModelConfig, stage_layers: Sequence[int]) -> Dict[str, int]:
    """Canonical name -> the first pipeline stage that holds it (a tied embedding: the first)."""
    out: Dict[str, int] = {}
    for stage, params in enumerate(stage_parameters(_meta_model(cfg, ParallelState()), stage_layers)):
        for name in params:
            out.setdefault(name, stage)
    return out
