"""Layout-free training state: fp32 weights and Adam moments under canonical parameter names.

DeepSpeed's native checkpoint is tied to the layout that wrote it (ZeRO partitions, TP and PP
ranks). Beside it every save writes this form: each (pipeline stage, TP rank) pair's data-parallel
rank 0 writes its TP shard of every parameter, un-partitioned over ZeRO (DeepSpeed's
``safe_get_full_*`` collectives), under the name the TP=1 unpipelined model uses, with each
parameter's TP split recorded. Any other layout rebuilds its own shards from these files, so
training resumes at a new TP/PP/DP/ZeRO layout with optimizer state intact. A vocabulary padded
for TP is stored without its padding (``pad_multiple`` in the split: re-padded for the reader's
TP); a tied embedding is stored once, by the first pipeline stage.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.errors import UserError
from megallama.parallel import ParallelState
from megallama.config.layout_rules import padded_vocab
from megallama.parallel.layers import logical_shape, merge_tp_shards, param_shard, tp_pieces

MOMENTS = ("exp_avg", "exp_avg_sq")


def canonical_params(module: torch.nn.Module, saving: bool = False) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(name in the TP=1 unpipelined model, parameter)`` for this rank's parameters. A pipeline
    stage's layers hold the model's parts under their canonical names (``train/pipeline.py``);
    only DeepSpeed's layer index sits above them. ``saving``: without a later stage's copy of a
    tied weight (DeepSpeed marks it ``ds_pipe_replicated``), so it is written once."""
    from deepspeed.pipe import PipelineModule

    if isinstance(module, PipelineModule):
        return [(name, p) for layer in module.forward_funcs for name, p in layer.named_parameters()
                if not (saving and getattr(p, "ds_pipe_replicated", False))]
    return list(module.named_parameters())


def _split_info(p) -> Dict:
    if getattr(p, "tensor_model_parallel", False):
        heads = getattr(p, "tp_fused_heads", None)
        info = {"split_dim": p.tp_split_dim, "fused_sizes": list(p.tp_fused_sizes),
                "fused_heads": list(heads) if heads else None}
        if getattr(p, "tp_pad_multiple", None):  # absent unless padded: older indexes stay valid
            info["pad_multiple"] = p.tp_pad_multiple
        return info
    return {"split_dim": None, "fused_sizes": None, "fused_heads": None}


def _stored(local: torch.Tensor, info: Dict, tp: int, rank: int) -> torch.Tensor:
    """What this TP rank writes of its shard: the blocks of heads it is the first to hold."""
    if info["split_dim"] is None or not info.get("fused_heads"):
        return local
    pieces = tp_pieces(info["fused_sizes"], info["fused_heads"], tp)
    blocks = torch.split(local, [piece for piece, _ in pieces], dim=info["split_dim"])
    kept = [b for b, (_, rep) in zip(blocks, pieces) if rank % rep == 0]
    return torch.cat(kept, dim=info["split_dim"]) if kept else local.narrow(info["split_dim"], 0, 0)


def _full_over_dp(engine, p, key=None) -> torch.Tensor:
    """This TP rank's shard of ``p`` (or an Adam moment), whole over ZeRO partitions."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megallama.train.deepspeed_patches import is_fp16_wrapper

    value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if value is not None:
        return value.detach().float().cpu()
    if key is None:  # ZeRO-0 fp32: the parameter is its own master copy
        return p.detach().float().cpu()
    state = engine.optimizer.state.get(p, {}) if hasattr(engine.optimizer, "state") else {}
    if key not in state and is_fp16_wrapper(engine.optimizer):
        raise UserError("checkpoint: fp16 without ZeRO keeps optimizer state DeepSpeed cannot export; "
                        "use ZeRO stage >= 1 with fp16")
    return state[key].detach().float().cpu() if key in state else torch.zeros(p.shape)


def save_universal(engine, module, state: ParallelState, out_dir: Path, meta: Dict) -> List[Path]:
    """Collective over every rank; returns the files this rank wrote."""
    from safetensors.torch import save_file

    from megallama.train.deepspeed_patches import relink_optimizer_fragments

    relink_optimizer_fragments(engine)
    tensors, index = {}, {}
    for name, p in canonical_params(module, saving=True):
        info = _split_info(p)
        tensors[name] = _stored(_full_over_dp(engine, p), info, state.tp, state.tp_rank)
        for key in MOMENTS:
            tensors[f"{name}::{key}"] = _stored(_full_over_dp(engine, p, key), info, state.tp, state.tp_rank)
        index[name] = info
    written = []
    if state.dp_rank == 0 and state.ulysses_rank == 0:  # Ulysses ranks hold the same weights too
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"pp{state.pp_rank:02d}-tp{state.tp_rank:02d}"
        path = out_dir / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        (out_dir / f"{stem}.index.json").write_text(json.dumps(index))
        written += [path, out_dir / f"{stem}.index.json"]
        if state.rank == 0:
            (out_dir / "layout.json").write_text(json.dumps({**meta, "tp": state.tp, "pp": state.pp, "dp": state.dp,
                                                                "ulysses": state.ulysses}))
            written.append(out_dir / "layout.json")
    return written


MAX_DEGREE = 4096  # TP or PP degree a layout file may claim (a bound before any list is sized by it)
_STEM = re.compile(r"^pp(\d{2,4})-tp(\d{2,4})$")


def _expected(cfg) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Dict]]:
    """Full shape and TP split of every parameter the config implies (a meta-device build)."""
    from megallama.model import build_model

    with torch.device("meta"):
        model = build_model(cfg, ParallelState(), seed=None)
    params = dict(model.named_parameters())
    return {n: logical_shape(p) for n, p in params.items()}, {n: _split_info(p) for n, p in params.items()}


def _shard_shape(full: Tuple[int, ...], info: Dict, tp: int, rank: int) -> Optional[Tuple[int, ...]]:
    """The shape TP rank ``rank`` stores (:func:`_stored`), or None if ``tp`` cannot split it."""
    if info["split_dim"] is None:
        return full
    dim = info["split_dim"]
    if info.get("pad_multiple"):
        parts = [padded_vocab(n, tp, info["pad_multiple"]) for n in info["fused_sizes"] or [full[dim]]]
        if any(n % tp for n in parts):
            return None
        return full[:dim] + (sum(parts) // tp,) + full[dim + 1:]
    try:
        pieces = tp_pieces(info["fused_sizes"] or [full[dim]], info.get("fused_heads"), tp)
    except ValueError:
        return None
    return full[:dim] + (sum(piece for piece, rep in pieces if rank % rep == 0),) + full[dim + 1:]


class UniversalReader:
    """Reads full logical tensors out of a universal directory written at any layout.

    Everything is checked before a byte of tensor data is read: the layout file and its model
    config (normal validation, memory check), each index against the parameters that config
    implies, and each safetensors header against the shard shapes; so a damaged or hostile
    directory is one line naming the file, and nothing larger than the config's model is read.
    """

    def __init__(self, src: Path):
        from megallama.checkpoint.safe_read import check_shipped, model_config, read_json, safetensors_header

        self.src = Path(src)
        layout_file = self.src / "layout.json"
        if not layout_file.is_file():
            raise UserError(f"{layout_file}: not found (not a layout-free checkpoint)")
        self.layout = read_json(layout_file)
        for key in ("tp", "pp"):
            value = self.layout.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEGREE:
                raise UserError(f"{layout_file}: '{key}' must be an integer in 1..{MAX_DEGREE}, got {value!r}"[:300])
        self.cfg = model_config(self.layout.get("model"), str(layout_file))
        tp = self.layout["tp"]
        shapes, splits = _expected(self.cfg)
        self.index: Dict[str, Dict] = {}
        self.files: Dict[str, List] = {}
        weights = []
        for idx_file in sorted(self.src.glob("pp*-tp*.index.json")):
            stem = idx_file.name[: -len(".index.json")]
            m = _STEM.match(stem)
            if not m or int(m.group(2)) >= tp:
                raise UserError(f"{idx_file}: not a shard of this layout (expected ppNN-tpNN with tp rank below "
                                f"{tp})")
            tp_rank, path = int(m.group(2)), self.src / f"{stem}.safetensors"
            header = safetensors_header(path)
            weights.append(path)
            for name, info in read_json(idx_file).items():
                if name not in shapes:
                    raise UserError(f"{idx_file}: parameter {name[:100]!r} is not in the layout's model")
                if isinstance(info, dict) and "fused_heads" not in info:  # written before heads were recorded
                    info = {**info, "fused_heads": splits[name]["fused_heads"]}
                if info != splits[name]:
                    raise UserError(f"{idx_file}: parameter '{name}' has split {info!r}, the model's is "
                                    f"{splits[name]!r}"[:300])
                shard = _shard_shape(shapes[name], info, tp, tp_rank)
                if shard is None:
                    raise UserError(f"{layout_file}: tp={tp} does not divide parameter '{name}'")
                for key in (None,) + MOMENTS:
                    tname = name if key is None else f"{name}::{key}"
                    got = header.get(tname)
                    if got is None or got[1] != shard or got[0] not in ("F32", "F16", "BF16", "F64"):
                        raise UserError(f"{path}: tensor '{tname}' is {got!r}, expected a float tensor of shape "
                                        f"{shard}")
                self.index[name] = info
                self.files.setdefault(name, [None] * tp)[tp_rank] = path
        for name, info in splits.items():
            held = self.files.get(name, [None])
            if (held[0] is None) if info["split_dim"] is None else any(h is None for h in held):
                raise UserError(f"{self.src}: parameter '{name}' (or one of its TP shards) is missing")
        check_shipped(self.cfg, weights, str(self.src), bytes_per_param=12)  # fp32 weight + two moments

    def names(self) -> Iterator[str]:
        return iter(self.index)

    def _get(self, path: Path, tensor_name: str) -> torch.Tensor:
        from megallama.checkpoint.safe_read import load_tensors

        return load_tensors(path, names=[tensor_name])[tensor_name]

    def full(self, name: str, key: str = None) -> torch.Tensor:
        if name not in self.index:
            raise UserError(f"{self.src}: parameter '{name}' missing from the checkpoint")
        tensor_name = name if key is None else f"{name}::{key}"
        info, paths = self.index[name], self.files[name]
        if info["split_dim"] is None:
            return self._get(paths[0], tensor_name)
        return merge_tp_shards([self._get(p, tensor_name) for p in paths], info["split_dim"], info["fused_sizes"],
                               fused_heads=info.get("fused_heads"), owned=True, pad_multiple=info.get("pad_multiple"))


def local_shard(reader: UniversalReader, name: str, p, state: ParallelState, key: str = None) -> torch.Tensor:
    return param_shard(reader.full(name, key), p, state.tp, state.tp_rank)


def load_weights_into_module(reader: UniversalReader, module, state: ParallelState) -> None:
    """Before ``deepspeed.initialize``: this rank's weights from the layout-free files."""
    import deepspeed

    for name, p in canonical_params(module):
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            with torch.no_grad():
                p.data.copy_(local_shard(reader, name, p, state).to(p.dtype))


def load_optimizer_state(reader: UniversalReader, engine, module, state: ParallelState, step: int,
                         moments: bool = True) -> None:
    """After ``deepspeed.initialize``: exact fp32 masters and (``moments``) Adam moments for this
    rank; without moments the optimizer stays fresh (``checkpoint.load_weights_only``) but its
    masters are the checkpoint's fp32 weights, not their bf16/fp16 rounding."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megallama.train.deepspeed_patches import holds_fp32_state, relink_optimizer_fragments

    if moments:
        _ensure_optimizer_state(engine, step)
    relink_optimizer_fragments(engine)
    opt = engine.optimizer
    for name, p in canonical_params(module):
        master = local_shard(reader, name, p, state)
        adam = {k: local_shard(reader, name, p, state, k) for k in MOMENTS} if moments else {}
        if holds_fp32_state(p):
            safe_set_full_fp32_param(p, master.to(p.device))
            for k, v in adam.items():
                safe_set_full_optimizer_state(p, v.to(p.device), k)
        else:  # ZeRO-0 fp32: torch's AdamW holds the state of the parameter itself
            for k, v in adam.items():
                opt.state[p][k].copy_(v)
    if dist.is_initialized():
        dist.barrier()


def _ensure_optimizer_state(engine, step: int) -> None:
    """Adam's state exists only after a first step; create it (zeros, ``step``) so it can be set."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    for group in base.param_groups:
        for p in group["params"]:
            st = base.state[p]
            for k in MOMENTS:
                if k not in st:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = torch.tensor(float(step))
