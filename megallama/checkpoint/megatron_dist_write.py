"""Writing megatron-core's ``torch_dist`` form (``convert --to megatron --format torch_dist``).

The layout is the one :mod:`~megallama.checkpoint.megatron_dist` reads: global tensors under
megatron-core's local-spec keys, layers stacked on a leading axis (each layer its own chunks, as
megatron-core's per-layer ShardedTensors write them), the linear layers' ``_extra_state``
objects, model-space Adam state (``optimizer.state.exp_avg.<key>``; fp32 masters in
``fp32_param`` when the weights are not fp32, or, for the distributed optimizer's
``fully_reshardable`` form, in ``param`` always), ``common.pt`` (args, iteration, param groups) and
``metadata.json``. Chunks are row blocks of at most ``CHUNK_BYTES`` (DCP reassembles any chunking on
load), each produced only when DCP writes it, so peak memory is about one layer's tensor and a
block. Written beside the output and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from megallama.checkpoint import megatron as mg
from megallama.checkpoint.megatron_dist import OPT, STACKED
from megallama.checkpoint.megatron_files import TRACKER, param_order
from megallama.checkpoint.streaming import CHUNK_BYTES, materialize
from megallama.config import ModelConfig
from megallama.checkpoint.staging import staged_dir

# megatron-core's sharded keys for the two norms its local spec folds into the next linear layer
_KEYS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
         "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
Chunks = Dict[str, Tuple[Tuple[int, ...], torch.dtype, Dict[int, Callable[[], torch.Tensor]]]]


def _chunks(makers: Dict[str, Callable], want: Dict[str, Tuple[int, ...]], n_layers: int, dtype: torch.dtype,
            prefix: str = "") -> Chunks:
    """Stored key -> (global shape, dtype, {layer, or -1 for an unstacked tensor: function giving it})."""
    out: Chunks = {}
    for name, make in makers.items():
        layer, rest = mg.layer_of(name)
        if layer is None:
            out[prefix + name] = (want[name], dtype, {-1: make})
        else:
            key = prefix + STACKED + _KEYS.get(rest, rest)
            out.setdefault(key, ((n_layers,) + want[name], dtype, {}))[2][layer] = make
    return out


def _planner(chunks: Chunks):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    def blocks(shape, dtype, stacked):
        """Row ranges of one chunk each: a layer's (or a tensor's) rows, at most ``CHUNK_BYTES`` a chunk."""
        inner = shape[1:] if stacked else shape
        row = max(1, math.prod(inner[1:]) * torch.empty((), dtype=dtype).element_size())
        step = max(1, CHUNK_BYTES // row)
        return [(a, min(a + step, inner[0])) for a in range(0, inner[0], step)]

    last: list = [None, None]  # the part whose row blocks are being written, computed once

    class StackedPlanner(DefaultSavePlanner):
        """Plans a chunk per row block of each layer (or unstacked tensor); each is produced only when
        DCP writes it."""

        def create_local_plan(self):
            plan = super().create_local_plan()  # the byte entries (extra state) as DCP plans them
            items = [i for i in plan.items if i.index.fqn not in chunks]
            for fqn, (shape, dtype, parts) in chunks.items():
                props = TensorProperties(dtype=dtype)
                for layer in sorted(parts):
                    lead = () if layer < 0 else (layer,)
                    for a, b in blocks(shape, dtype, layer >= 0):
                        offsets = lead + (a,) + (0,) * (len(shape) - len(lead) - 1)
                        sizes = (1,) * len(lead) + (b - a,) + shape[len(lead) + 1:]
                        items.append(WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)),
                                               type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                                                   ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                                   props, torch.Size(shape))))
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def lookup_object(self, index):
            if index.fqn not in chunks:
                return super().lookup_object(index)
            shape, dtype, parts = chunks[index.fqn]
            layer = -1 if -1 in parts else int(index.offset[0])
            a = int(index.offset[0 if layer < 0 else 1])
            b = next(stop for start, stop in blocks(shape, dtype, layer >= 0) if start == a)
            if last[0] != (index.fqn, layer):
                last[:] = [None, None]  # the previous part goes before the next is computed
                last[:] = [(index.fqn, layer), parts[layer]()]
            t = materialize(mg._rows(last[1], a, b)).to(dtype)
            return (t.unsqueeze(0) if layer >= 0 else t).detach().contiguous()

    return StackedPlanner(dedup_save_to_lowest_rank=False)


def save_torch_dist(state, cfg: ModelConfig, out: Path, tp: int = 1, iteration: int = 0, consumed: int = 0,
                    dtype: Optional[torch.dtype] = None, optimizer=None, distributed: bool = False) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    mg.check_layout(cfg, tp)
    dtype = dtype or next(iter(state.values())).dtype
    n = cfg.n_layers
    padded = mg.padded_vocab(cfg, tp)
    meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in mg.from_megallama(meta, cfg, 1, [n], 0, 0, padded=padded).items()}
    chunks = _chunks(mg.shard_makers(state, cfg, 1, [n], 0, 0, padded=padded), want, n, dtype)
    args = mg.args_for(cfg, tp, 1, iteration, consumed, dtype)
    args.ckpt_format, args.use_distributed_optimizer = "torch_dist", distributed
    common = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
    if optimizer is not None:
        masters, moments = optimizer
        for key, src in (("param" if distributed else "fp32_param", masters), *moments.items()):
            if key != "fp32_param" or dtype != torch.float32:  # fp32 weights are their own masters
                makers = mg.shard_makers(src, cfg, 1, [n], 0, 0, padded=padded)
                chunks.update(_chunks(makers, want, n, torch.float32, f"{OPT}{key}."))
        groups = [g for g in param_order(list(want), lambda k: want[k]) if g]
        common["optimizer"] = {"param_groups": [  # megatron-core's hyperparameters; Adam's step is the iteration
            {"lr": 0.0, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1 * (gi == 0), "wd_mult": float(gi == 0),
             "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False, "amsgrad": False,
             "step": iteration} for gi in range(len(groups))]}
        if distributed:  # its fully_reshardable form: the masters of every weight, fp32 or not, as 'param'
            common["optimizer"] = {"optimizer": common["optimizer"], "param_state_sharding_type": "fully_reshardable"}
    state_dict = {fqn: torch.empty(shape, dtype=d, device="meta") for fqn, (shape, d, _) in chunks.items()}
    for linear in _LINEARS:
        for i in range(n):
            state_dict[f"{STACKED}{linear}._extra_state/shard_{i}_{n}"] = [None]  # no fp8 metadata
    out = Path(out)
    with staged_dir(out) as tmp:
        it = tmp / f"iter_{iteration:07d}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
            dcp.save(state_dict, storage_writer=FileSystemWriter(str(it), single_file_per_rank=False), planner=_planner(chunks),
                     no_dist=True)
        torch.save(common, it / "common.pt")
        (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                      "common_backend": "torch", "common_backend_version": 1}))
        (tmp / TRACKER).write_text(str(iteration))
    return out

