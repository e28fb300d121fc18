"""Writing Megatron's legacy checkpoint (``iter_NNNNNNN/mp_rank_TT[_SSS]/model_optim_rng.pt``),
tensor by tensor.

``torch.save`` pickles a whole dict, so a rank file would hold its shard in memory. Instead the
file is saved with placeholders whose space is reserved (``skip_data`` with fake tensors), then
each tensor is computed and copied in through a shared mapping of the file, a block of rows per
mapping: peak memory is about one block, whatever the model's size. The files load in
megatron-core (local-spec names, ``_extra_state`` entries) and in
:mod:`~megallama.checkpoint.megatron_files`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megallama.checkpoint import megatron as mg
from megallama.checkpoint.megatron_dopt import rank_entry
from megallama.checkpoint.megatron_files import DOPT_FILE, FILE, MOMENTS, TRACKER, _at, allowed_globals, param_order
from megallama.checkpoint.streaming import CHUNK_BYTES, materialize, nbytes
from megallama.config import ModelConfig
from megallama.checkpoint.staging import staged_dir


def save_megatron(state, cfg: ModelConfig, out: Path, tp: int, pp: int, iteration: int = 0, consumed: int = 0,
                  dtype: Optional[torch.dtype] = None, optimizer=None, betas=(0.9, 0.95), eps: float = 1e-8,
                  weight_decay: float = 0.1, distributed: bool = False) -> Path:
    """Write a legacy Megatron checkpoint directory atomically, tensor by tensor (:func:`save_streamed`).
    ``optimizer``: ``(masters, {moment: state})`` in megallama's names, in the form of Megatron's
    FP32Optimizer for fp32 weights, of its Float16Optimizer (with fp32 masters) otherwise, or with
    ``distributed`` of its DistributedOptimizer (``distrib_optim.pt``, :mod:`~megallama.checkpoint.megatron_dopt`)."""
    mg.check_layout(cfg, tp)
    counts = mg.even_layers(cfg, pp)
    dtype = dtype or next(iter(state.values())).dtype
    out = Path(out)
    with staged_dir(out) as tmp:
        it_dir = tmp / f"iter_{iteration:07d}"
        args = mg.args_for(cfg, tp, pp, iteration, consumed, dtype)
        args.use_distributed_optimizer = distributed
        args.accumulate_allreduce_grads_in_fp32 = dtype == torch.bfloat16  # as Megatron sets it under --bf16
        for s in range(pp):
            for t in range(tp):
                makers = mg.shard_makers(state, cfg, tp, counts, s, t)
                shapes = _shapes(state, cfg, tp, counts, s, t)
                fills = {("model", n): (lambda make=make: make().to(dtype)) for n, make in makers.items()}
                model = {n: _placeholder(shapes[n], dtype) for n in makers}
                entry = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                         "model": _with_extra_state(model, cfg.tie_embeddings and s == pp - 1)}
                hyper = dict(betas=betas, eps=eps, weight_decay=weight_decay)
                dopt = None
                if optimizer is not None and distributed:
                    entry["optimizer"] = {"optimizer": {"param_groups": _param_groups(shapes, iteration, hyper)}}
                    masters, moments = optimizer
                    makers = {k: mg.shard_makers(v, cfg, tp, counts, s, t) for k, v in (("master", masters),
                                                                                         *moments.items())}
                    dopt = rank_entry(list(shapes), shapes, makers, dtype, args, cfg.tie_embeddings, s, pp,
                                      _placeholder)
                elif optimizer is not None:
                    entry["optimizer"], more = _optimizer_entry(optimizer, cfg, tp, counts, s, t, shapes, dtype,
                                                                iteration, hyper)
                    fills.update(more)
                rank_dir = it_dir / (f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else ""))
                rank_dir.mkdir(parents=True)
                save_streamed(rank_dir / FILE, entry, fills)
                if dopt is not None:
                    save_streamed(rank_dir / DOPT_FILE, *dopt)
        (tmp / TRACKER).write_text(str(iteration))
    return out


_FAKE = None


def _placeholder(shape, dtype) -> torch.Tensor:
    """A tensor with a shape and dtype but no data, for which ``torch.save`` reserves space."""
    global _FAKE
    from torch._subclasses.fake_tensor import FakeTensorMode

    _FAKE = _FAKE or FakeTensorMode()
    with _FAKE:
        return torch.empty(shape, dtype=dtype)


def _shapes(state, cfg, tp, counts, s, t) -> Dict[str, Tuple[int, ...]]:
    meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in mg.from_megallama(meta, cfg, tp, counts, s, t).items()}


def save_streamed(path: Path, entry: Dict, fills: Dict[Tuple, Any]) -> None:
    """``torch.save(entry)`` holding one tensor at a time: the file is written with the space of
    each placeholder reserved (``skip_data``), then each tensor at a ``fills`` key path is computed
    and copied in place through a shared mapping of the file, which is dropped before the next."""
    import mmap

    from torch.serialization import set_default_mmap_options, skip_data

    from megallama.checkpoint.safe_pickle import load_weights_only

    with skip_data(materialize_fake_tensors=True):
        torch.save(entry, path)
    with set_default_mmap_options(mmap.MAP_SHARED):
        for keys, make in fills.items():
            value = make()
            rows = value.shape[0] if value.shape else 1
            step = max(1, CHUNK_BYTES // max(1, nbytes(value) // max(rows, 1)))
            for a in range(0, rows, step):  # a block of rows per mapping: its dirty pages leave with it
                block = materialize(mg._rows(value, a, min(a + step, rows)) if value.shape else value)
                data = load_weights_only(path, allowed_globals(), mmap=True)
                target = _at(data, keys)
                (target[a:a + step] if value.shape else target).copy_(block)
                del data, target, block
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _with_extra_state(model: Dict[str, torch.Tensor], tied_last: bool) -> Dict[str, Any]:
    """megatron-core's linear layers save an ``_extra_state`` entry (None here: no fp8 metadata)
    and a strict load requires it; a tied output layer keeps that entry without a weight."""
    out: Dict[str, Any] = {}
    for name, value in model.items():
        out[name] = value
        if name.endswith(("linear_proj.weight", "linear_qkv.weight", "linear_fc1.weight", "linear_fc2.weight", mg.OUT)):
            out[name[: -len("weight")] + "_extra_state"] = None
    if tied_last and mg.OUT not in model:
        out["output_layer._extra_state"] = None
    return out


def _param_groups(shapes, step, hyper) -> list:
    """Megatron's two Adam groups (decayed weights, then norms); ``step`` kept in each group as the
    DistributedOptimizer's state dict keeps it (torch Adam keeps it per parameter instead)."""
    groups = param_order(list(shapes), lambda n: shapes[n])
    out = [{"lr": 0.0, "betas": tuple(hyper["betas"]), "eps": hyper["eps"],
            "weight_decay": hyper["weight_decay"] * (gi == 0), "amsgrad": False, "wd_mult": float(gi == 0),
            "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False} for gi in range(len(groups))]
    for g in out if step is not None else ():
        g["step"] = float(step)
    return out


def _optimizer_entry(optimizer, cfg, tp, counts, s, t, shapes, dtype, step, hyper) -> Tuple[Dict, Dict]:
    """Megatron's optimizer entry for one rank (placeholders) and the fills of its tensors."""
    masters, moments = optimizer
    makers = {k: mg.shard_makers(v, cfg, tp, counts, s, t) for k, v in (("master", masters), *moments.items())}
    groups = param_order(list(shapes), lambda n: shapes[n])
    fp32 = dtype == torch.float32  # FP32Optimizer: the weights are the masters
    base = ("optimizer",) if fp32 else ("optimizer", "optimizer")
    state, param_groups, fills, idx = {}, _param_groups(shapes, None, hyper), {}, 0
    for group, param_group in zip(groups, param_groups):
        ids = list(range(idx, idx + len(group)))
        idx += len(group)
        param_group["params"] = ids
        for i, name in zip(ids, group):
            state[i] = {"step": torch.tensor(float(step))}
            for k in MOMENTS:
                state[i][k] = _placeholder(shapes[name], torch.float32)
                fills[base + ("state", i, k)] = lambda f=makers[k][name]: f().to(torch.float32)
    adam = {"state": state, "param_groups": param_groups}
    if fp32:
        return adam, fills
    for gi, group in enumerate(groups):
        for j, name in enumerate(group):
            fills[("optimizer", "fp32_from_fp16_params", gi, j)] = \
                lambda f=makers["master"][name]: f().to(torch.float32)
    return ({"optimizer": adam, "fp32_from_fp16_params": [[_placeholder(shapes[n], torch.float32) for n in g]
                                                          for g in groups]}, fills)
