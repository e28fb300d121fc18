"""Where a run starts: the checkpoint every rank verifies a share of and agrees on (gated), and what
every rank then needs to continue from it (step, data position, layout-free state when the layout
changed, and always under node-local storage: DeepSpeed's loader reads other nodes' files)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist

from megallama.checkpoint.ds_universal import find_ds_universal, is_ds_universal
from megallama.config import RunConfig, TrainConfig
from megallama.errors import UserError
from megallama.train import checkpoint as ckpt
from megallama.train.distributed import on_rank0_then_share
from megallama.train.storage import Storage
from megallama.train.unpickle_gate import check_safe_to_unpickle
from megallama.train.verify_dist import collective, first_of_all, verify_all

log = logging.getLogger(__name__)

# what a checkpoint's LR schedule and batch sizes are tied to; checkpoints older than a field had its default
SCHEDULE = ("steps", "warmup_steps", "lr", "min_lr_ratio", "lr_schedule", "lr_decay_fraction", "rampup_batch_size")
LAYOUT = ("tp", "pp", "dp", "ulysses", "zero", "precision")  # what DeepSpeed's own files are tied to
LAYOUT_DEFAULTS = {"ulysses": 1}  # what a checkpoint written before a layout field had
PIPELINE = ("stage_names", "stage_layers")  # and with a pipeline: parameter names, blocks per stage


@dataclass
class Resume:
    path: Optional[Path] = None  # None: a fresh start
    step: int = 0
    consumed_samples: int = 0
    universal: Any = None  # a UniversalReader when the layout changed (DeepSpeed's files do not fit)
    refit: bool = False  # the LR schedule changed (train.allow_schedule_change)
    weights_only: bool = False  # checkpoint.load_weights_only: its weights at step 0, fresh optimizer and schedule

    @property
    def native(self) -> bool:
        """DeepSpeed's own files restore the engine (same layout)."""
        return self.path is not None and self.universal is None


def has_native(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*model_states.pt"))


def find_start(cfg: RunConfig, ckpt_dir: Path, storage: Storage = Storage()) -> Optional[Path]:
    """Collective: the checkpoint to start from, verified by every rank (each a share of its
    files); every rank gets the same answer or the same one-line error."""
    found = None
    if cfg.checkpoint.resume and on_rank0_then_share(ckpt_dir.is_dir):
        found = ckpt.find_resumable(ckpt_dir, storage)
    if found is None and cfg.checkpoint.load:
        found = Path(cfg.checkpoint.load)
        universal = on_rank0_then_share(lambda: find_ds_universal(found))
        if universal is not None:  # DeepSpeed's ds_to_universal output: no manifest, its reader checks every file
            return universal
        if on_rank0_then_share((found / ckpt.LATEST).is_file):
            found = ckpt.find_resumable(found, storage)
        else:
            problem = verify_all(found, storage)
            if problem:
                err = UserError(f"checkpoint.load: {problem}")
                err.same_on_every_rank = True
                raise err
    if found is not None and not storage.node_local and has_native(found):
        _gate_on_every_rank(found)
    return found


def _gate_on_every_rank(tag_dir: Path) -> None:
    """Collective: each rank opens (weights-only, mapped) its share of the files DeepSpeed will
    unpickle; the first refusal in rank order is every rank's error."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective() else (0, 1)
    try:
        check_safe_to_unpickle(tag_dir, rank, world)
        problem = None
    except UserError as exc:
        problem = str(exc)
    problem = first_of_all(problem)
    if problem:
        err = UserError(problem)
        err.same_on_every_rank = True
        raise err


def plan_resume(cfg: RunConfig, ckpt_dir: Path, layout: Dict[str, Any], rank0: bool,
                storage: Storage = Storage()) -> Resume:
    """The checkpoint this run continues (none: a fresh start), checked against ``cfg``."""
    path = find_start(cfg, ckpt_dir, storage)
    if path is None:
        return Resume()
    universal = None
    if is_ds_universal(path):  # DeepSpeed's ds_to_universal output: its reader stands in for our universal/
        from megallama.checkpoint.ds_universal import DsUniversalReader

        universal = DsUniversalReader(path)
    meta = universal.meta if universal else ckpt.read_meta(path)
    check_same_model(meta, cfg, path)
    if cfg.checkpoint.load_weights_only and path.parent.resolve() != ckpt_dir.resolve():
        from megallama.train.universal import UniversalReader

        if rank0:
            log.info("starting from the weights of %s (step %d) at step 0: fresh optimizer, LR schedule and data "
                     "position (checkpoint.load_weights_only)", path, int(meta["step"]))
        return Resume(path, universal=universal or UniversalReader(path / "universal"), weights_only=True)
    refit = schedule_changed(meta, cfg, path)
    same_layout = (universal is None and has_native(path) and not storage.node_local
                   and all(meta.get(k, LAYOUT_DEFAULTS.get(k)) == layout[k] for k in LAYOUT)
                   and (layout["pp"] == 1 or all(meta.get(k) == layout[k] for k in PIPELINE)))
    if not same_layout and universal is None:
        from megallama.train.universal import UniversalReader

        universal = UniversalReader(path / "universal")
    if rank0:
        log.info("resuming from %s at step %d (%s)", path, int(meta["step"]),
                 "same layout: DeepSpeed checkpoint" if same_layout else
                 "DeepSpeed universal checkpoint" if is_ds_universal(path) else
                 "node-local storage: layout-free state" if storage.node_local else "new layout: layout-free state")
    return Resume(path, int(meta["step"]), int(meta["consumed_samples"]), universal, refit)


def check_same_model(meta, cfg: RunConfig, path: Path) -> None:
    init_only = ("dropout", "init_std")  # how weights are drawn or dropped, not what the loaded ones are
    saved = {k: v for k, v in meta["model"].items() if k not in init_only}
    now = {k: v for k, v in cfg.model.model_dump().items() if k not in init_only}
    for m in (saved, now):  # n_kv_heads None means n_heads (an HF import spells it out)
        m["n_kv_heads"] = m.get("n_kv_heads") or m.get("n_heads")
    diff = sorted(k for k in now if saved.get(k) != now[k])
    if diff:
        raise UserError(f"checkpoint {path}: model.{diff[0]} is {saved.get(diff[0])!r} there, "
                        f"{now[diff[0]]!r} in this config")


def schedule_changed(meta, cfg: RunConfig, path: Path) -> bool:
    """A resume under another LR schedule is refused, as Megatron refuses it unless told
    (--override-opt_param-scheduler): the cosine would silently re-stretch from the resume step.
    ``train.allow_schedule_change`` opts in; True then (the caller re-fits the schedule)."""
    saved, t = meta.get("schedule"), cfg.train
    if saved:
        saved = {k: saved.get(k, TrainConfig.model_fields[k].default) for k in SCHEDULE}
    diff = [k for k in SCHEDULE if saved and saved[k] != getattr(t, k)]
    if not diff:
        return False
    k = diff[0]
    if not t.allow_schedule_change:
        raise UserError(f"train.{k}: {getattr(t, k)} differs from {saved[k]} in checkpoint {path}, whose LR schedule "
                        f"it would re-stretch from step {meta['step']}; set train.{k}={saved[k]} to continue that "
                        "schedule, or train.allow_schedule_change=true to re-fit it")
    log.warning("train.%s: %s (checkpoint: %s): re-fitting the LR schedule from step %d "
                "(train.allow_schedule_change=true)", k, getattr(t, k), saved[k], meta["step"])
    return True
