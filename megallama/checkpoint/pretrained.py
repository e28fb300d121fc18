"""``from_pretrained(DIR)``: a ready-to-run model from any checkpoint directory megallama reads.

The directory's kind is detected (consolidated, Hugging Face, Meta release, or a training
checkpoint, which the resharding tools consolidate); everything goes through one full TP=1
state dict, from which each TP rank keeps its own slice, so a model loads at any TP degree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from megallama.config import ModelConfig
from megallama.errors import UserError
from megallama.parallel import ParallelState

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def checkpoint_kind(path) -> str:
    """'consolidated', 'hf', 'meta' or 'training' (any other directory)."""
    from megallama.checkpoint.consolidated import is_consolidated
    from megallama.checkpoint.hf import is_hf_dir
    from megallama.checkpoint.meta import is_meta_dir

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: not found")
    if not p.is_dir():
        raise UserError(f"{p}: not a checkpoint directory")
    if is_consolidated(p):
        return "consolidated"
    if is_hf_dir(p):
        return "hf"
    if is_meta_dir(p):
        return "meta"
    return "training"


def consolidate_training(path, resolved: bool = False) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """A training checkpoint as ``(config, full state)``, via the resharding tools (``resolved``:
    ``path`` is the verified tag directory, not verified again)."""
    from megallama.checkpoint.reshard import consolidate_training_checkpoint

    return consolidate_training_checkpoint(path, resolved)


def load_checkpoint(path, resolved: bool = False) -> Tuple[ModelConfig, Dict[str, torch.Tensor], str]:
    """``(config, full TP=1 state dict, kind)`` of any supported checkpoint directory (``resolved``:
    a training checkpoint's tag directory, already verified)."""
    kind = "training" if resolved else checkpoint_kind(path)
    if kind == "consolidated":
        from megallama.checkpoint.consolidated import load_consolidated

        cfg, state = load_consolidated(path)
    elif kind == "hf":
        from megallama.checkpoint.hf import load_hf

        cfg, state = load_hf(path)
    elif kind == "meta":
        from megallama.checkpoint.meta import load_meta

        cfg, state = load_meta(path)
    else:
        cfg, state = consolidate_training(path, resolved)
    return cfg, state, kind


def verified_with_tokenizer(path, tokenizer=None) -> Tuple[Optional[Path], Optional[Path]]:
    """A checkpoint opened for a run over it (``generate``, ``finetune``): a training checkpoint's
    verified step directory (None for other kinds: pass it as ``load_checkpoint(tag,
    resolved=True)``, so it is hashed once) and the tokenizer: ``tokenizer`` when named, else the
    checkpoint's own (:func:`megallama.checkpoint.reshard.checkpoint_tokenizer`: a file in its
    directory, else the training run's recorded one)."""
    from megallama.checkpoint.reshard import checkpoint_tokenizer, resolve_checkpoint

    tag = resolve_checkpoint(path) if checkpoint_kind(path) == "training" else None
    return tag, (Path(tokenizer) if tokenizer else checkpoint_tokenizer(path, tag))


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise UserError(f"dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def load_state_for_rank(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy full weights into ``model``, each rank the slice of the layout it was built for."""
    from megallama.parallel.layers import param_shard

    ps = model.parallel_state
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        what = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{extra[0]}'"
        raise UserError(f"{where}: {what} for a {type(model).__name__}")
    with torch.no_grad():
        for name, param in params.items():
            full = param_shard(state[name], param, ps.tp, ps.tp_rank)
            if tuple(full.shape) != tuple(param.shape):
                raise UserError(f"{where}: tensor '{name}' has shape {tuple(full.shape)}, expected "
                                f"{tuple(param.shape)}")
            param.copy_(full)


def build_for_inference(cfg: ModelConfig, state: Dict[str, torch.Tensor], dtype=None, device=None,
                        where: str = "checkpoint", parallel: Optional[ParallelState] = None) -> torch.nn.Module:
    """The model at the layout ``parallel`` (one process when None) holding ``state``, in eval
    mode, without gradients."""
    from megallama.checkpoint.consolidated import expected_shapes
    from megallama.checkpoint.safe_read import check_fits_memory
    from megallama.model import LlamaForSequenceClassification, build_model

    check_fits_memory(cfg, where)  # before building: the config, not the files, sizes the model
    for name, shape in expected_shapes(cfg, where, classifier="score.weight" in state).items():
        got = tuple(state[name].shape) if name in state else None
        if got != shape:
            raise UserError(f"{where}: tensor '{name}' has shape {got}, expected {shape} from the config")
    if not state:
        raise UserError(f"{where}: holds no tensors")
    dtype = resolve_dtype(dtype) or next(iter(state.values())).dtype
    build = LlamaForSequenceClassification if "score.weight" in state else build_model  # fine-tuned: a classifier
    model = build(cfg, parallel or ParallelState(), seed=None, device=device, dtype=dtype)  # weights follow
    load_state_for_rank(model, state, where)
    model.requires_grad_(False)
    return model.eval()


def from_pretrained(path: Union[str, Path], dtype=None, device=None,
                    parallel: Optional[ParallelState] = None) -> torch.nn.Module:
    """Load a model for inference from a consolidated, Hugging Face, Meta or training checkpoint.

    ``dtype`` (a torch dtype or 'float32'/'bf16'/'fp16') defaults to the checkpoint's own. The
    model is built at the layout ``parallel`` (from :func:`megallama.parallel.initialize`): each
    rank keeps its slice of the weights; None is a single process.
    """
    cfg, state, _ = load_checkpoint(path)
    model = build_for_inference(cfg, state, dtype, device, where=str(path), parallel=parallel)
    model.checkpoint_path = str(path)
    return model
