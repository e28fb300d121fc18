"""The decoder as a DeepSpeed ``PipelineModule``: embedding, blocks and norm+head as layer specs.

Specs are built lazily, so each stage constructs only its own layers (with TP inside them), and
each part is initialised from the same keyed seeds as the unpipelined model: a PP=2 run starts
from exactly the weights of the PP=1 run.
"""
from __future__ import annotations

import torch
from torch import nn

from megallama.config import ModelConfig
from megallama.model.blocks import TransformerBlock, init_module, residual_dropout
from megallama.model.llama import causal_lm_loss
from megallama.model.norm import RMSNorm
from megallama.model.rope import RotaryEmbedding
from megallama.parallel import ColumnParallelLinear, ParallelState, VocabParallelEmbedding


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, seed: int):
        super().__init__()
        self.dropout = cfg.dropout
        self.parallel_state = state
        self.tok_embeddings = VocabParallelEmbedding(state, cfg.vocab_size, cfg.dim, init_std=cfg.init_std)
        init_module(self.tok_embeddings, seed, "tok_embeddings")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return residual_dropout(self.tok_embeddings(tokens), self.dropout, self.training, self.parallel_state)


class BlockPipe(TransformerBlock):
    def __init__(self, cfg: ModelConfig, state: ParallelState, layer_id: int, seed: int):
        super().__init__(cfg, state, layer_id, causal=True)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        init_module(self, seed, f"layers.{layer_id}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h, self.rope)


class HeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, seed: int):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, sp_group=state.sp_group)
        self.output = ColumnParallelLinear(state, cfg.dim, cfg.vocab_size, init_std=cfg.init_std)
        init_module(self.output, seed, "output")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))  # this rank's vocab slice; the loss never gathers it


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class LlamaPipelineModule(PipelineModule):
        def _is_checkpointable(self, funcs):
            # recompute transformer blocks only: the embedding's input (token ids) carries no
            # gradient, so a checkpointed chunk starting there would cut the graph
            return all(isinstance(f, BlockPipe) for f in funcs)

    return LlamaPipelineModule


def build_pipeline_module(cfg: ModelConfig, state: ParallelState, seed: int, partition: str,
                          checkpoint_every: int = 0, checkpoint_fn=None):
    from deepspeed.pipe import LayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    specs = [LayerSpec(EmbeddingPipe, cfg, state, seed)]
    specs += [LayerSpec(BlockPipe, cfg, state, i, seed) for i in range(cfg.n_layers)]
    specs += [LayerSpec(HeadPipe, cfg, state, seed)]
    tp = state.tensor_parallel
    topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)
    kwargs = {}
    if checkpoint_every > 0:
        kwargs = dict(activation_checkpoint_interval=checkpoint_every, activation_checkpoint_func=checkpoint_fn)
    return _pipeline_module_class()(layers=specs, loss_fn=lambda logits, labels: causal_lm_loss(logits, labels, tp),
                          topology=topology,
                          partition_method="parameters" if partition == "parameters" else "type:BlockPipe",
                          **kwargs)
