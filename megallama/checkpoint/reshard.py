"""Training checkpoints at any layout -> any other layout, or -> the consolidated hub.

Every training checkpoint carries a layout-free ``universal/`` part (see
``megallama.train.universal``): full-over-ZeRO fp32 weights and Adam moments per TP shard under
canonical names. Re-sharding merges the TP shards and splits them again for the target TP
degree; the pipeline degree only decides file grouping, since names are already unpipelined.
The result is a checkpoint directory (``latest`` + one tag) that ``megallama train`` resumes at
the new layout (set ``checkpoint.load`` to it), optimizer state and data position included.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from megallama.config import ModelConfig, layout_rules
from megallama.config.pipeline_split import stage_layers
from megallama.errors import UserError
from megallama.parallel.layers import split_for_rank
from megallama.checkpoint.staging import staged_dir


def resolve_checkpoint(path) -> Path:
    """The tag directory ``path`` names, verified: ``path`` itself, or what its ``latest`` names.

    Never another step: training resume may fall back to an older checkpoint (and logs it), but a
    conversion or evaluation of "latest" that quietly used an older step would report on weights
    the user did not ask for. The error names the broken file and the older tag to pass instead.
    """
    from megallama.train import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: not found")
    for ckpt_dir in (p, p / "checkpoints"):
        if (ckpt_dir / ckpt.LATEST).is_file():
            return _latest(ckpt_dir)
    problem = ckpt.verify(p)
    if problem:
        raise UserError(problem)
    return p


def _latest(ckpt_dir: Path) -> Path:
    from megallama.train import checkpoint as ckpt

    pointer = ckpt_dir / ckpt.LATEST
    named = ckpt_dir / pointer.read_text().strip()
    problem = ckpt.verify(named) if named.is_dir() else f"{named}: missing (named by {pointer})"
    if problem is None:
        return named
    older = [t for t in ckpt.list_tags(ckpt_dir) if t.name < named.name and ckpt.verify(t, checksums=False) is None]
    hint = f"; to use the previous checkpoint instead, pass {older[0]}" if older else ""
    raise UserError(f"{problem}: the latest checkpoint is incomplete{hint}")


def recorded_tokenizer(tag) -> Optional[Path]:
    """The tokenizer file the run of a training checkpoint (``tag``: a verified step directory) made
    its tokens with (``data.tokenizer``, or the embedded corpus's own in its cache), which the
    trainer records absolute in each ``meta.json``; None for an older checkpoint. A recorded file
    that is gone is refused: an export without it would look complete."""
    from megallama.train.checkpoint import read_meta

    where = Path(tag) / "meta.json"
    data = read_meta(Path(tag)).get("data") or {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: 'data' must be an object, got {data!r}"[:300])
    recorded = data.get("tokenizer")
    if recorded is None:
        return None
    if not isinstance(recorded, str) or not recorded:
        raise UserError(f"{where}: data.tokenizer must be a file path, got {recorded!r}"[:300])
    if not Path(recorded).is_file():
        raise UserError(f"{where}: data.tokenizer {recorded} not found (the run's tokenizer was moved or "
                        "deleted); pass --tokenizer FILE")
    return Path(recorded)


def checkpoint_tokenizer(directory, tag=None) -> Optional[Path]:
    """The tokenizer a checkpoint brings when none is named: a ``tokenizer.model``/``.json`` in
    ``directory``, else, for a training checkpoint (``tag``: its verified step), the run's
    recorded one (:func:`recorded_tokenizer`). ``convert`` and ``generate`` both go by it."""
    from megallama.data.tokenizer import find_tokenizer

    return find_tokenizer(directory) or (recorded_tokenizer(tag) if tag is not None else None)


def consolidate_training_checkpoint(path, resolved: bool = False) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """``(model config, full fp32 state dict)`` of a training checkpoint at any layout; ``resolved``:
    ``path`` is the tag directory :func:`resolve_checkpoint` returned (not hashed a second time)."""
    from megallama.train.universal import UniversalReader

    tag = Path(path) if resolved else resolve_checkpoint(path)
    reader = UniversalReader(tag / "universal")
    cfg = ModelConfig.model_validate(reader.layout["model"])
    return cfg, {name: reader.full(name) for name in reader.names()}


def reshard(src, out, tp: int, pp: int, overwrite: bool = False) -> Path:
    """Write a checkpoint directory at ``tp`` x ``pp`` from any training checkpoint. Files are
    grouped by stage as training's default split (``parameters``) places blocks; a run of any
    split resumes from them, since it reads every file (names are unpipelined)."""
    from safetensors.torch import save_file

    from megallama.train import checkpoint as ckpt
    from megallama.train.pipeline import stage_of_parameters
    from megallama.train.universal import MOMENTS, UniversalReader

    tag = resolve_checkpoint(src)
    reader = UniversalReader(tag / "universal")
    cfg = ModelConfig.model_validate(reader.layout["model"])
    out = Path(out)
    _check_target(cfg, out, tp, pp, overwrite)
    split = stage_layers(cfg.n_layers, pp, "parameters", None, cfg.pipeline_weights())
    with staged_dir(out) as tmp:
        dst = tmp / tag.name / "universal"
        dst.mkdir(parents=True)
        files: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
        index: Dict[Tuple[int, int], Dict] = {}
        stage_of = stage_of_parameters(cfg, split) if pp > 1 else {}  # only a decoder is pipelined
        for name in reader.names():
            info = reader.index[name]
            stage = stage_of.get(name, 0)
            for key in (None,) + MOMENTS:
                full = reader.full(name, key)
                tname = name if key is None else f"{name}::{key}"
                for r in range(tp):
                    if info["split_dim"] is None:
                        if r:
                            continue
                        part = full
                    else:
                        part = split_for_rank(full, info["split_dim"], info["fused_sizes"], tp, r,
                                              fused_heads=info.get("fused_heads"), owned=True,
                                              pad_multiple=info.get("pad_multiple"))
                    files.setdefault((stage, r), {})[tname] = part.contiguous()
                    index.setdefault((stage, r), {})[name] = info
        for (stage, r), tensors in files.items():
            stem = f"pp{stage:02d}-tp{r:02d}"
            save_file(tensors, str(dst / f"{stem}.safetensors"))
            (dst / f"{stem}.index.json").write_text(json.dumps(index[(stage, r)]))
        layout = {**reader.layout, "tp": tp, "pp": pp, "dp": None, "zero": None, "stage_layers": split,
                  "resharded_from": str(tag)}
        (dst / "layout.json").write_text(json.dumps(layout))
        meta = ckpt.read_meta(tag)  # checked: a damaged meta.json is one line, not a traceback
        meta.update(tp=tp, pp=pp, dp=None, zero=None, stage_layers=split)
        (tmp / tag.name / "meta.json").write_text(json.dumps(meta, indent=1))
        ckpt.write_manifest(tmp / tag.name)
        (tmp / ckpt.LATEST).write_text(tag.name)
    return out


def _check_target(cfg: ModelConfig, out: Path, tp: int, pp: int, overwrite: bool) -> None:
    problem = (layout_rules.positive_problem("tp", tp) or layout_rules.positive_problem("pp", pp)
               or layout_rules.layout_problem(cfg.shape, tp, pp))
    if problem:
        raise UserError(f"--tp/--pp: {problem}")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (refusing to overwrite; pass --overwrite)")


def convert_training_checkpoint(src, out, tp: int, pp: int, overwrite: bool = False) -> int:
    """``megallama convert --input CKPT --output OUT [--tp T --pp P]``: a training checkpoint at
    ``tp`` x ``pp``, from a training checkpoint or from consolidated (pretrained) weights."""
    from megallama.checkpoint.consolidated import is_consolidated

    if is_consolidated(src):  # pretrained weights -> a step-0 training checkpoint at a layout
        out = from_consolidated(src, out, tp, pp, overwrite=overwrite)
    else:
        out = reshard(src, out, tp, pp, overwrite=overwrite)
    print(f"wrote {out} at tp={tp} pp={pp}; train from it with --set checkpoint.load={out}")
    return 0


def from_consolidated(src, out, tp: int, pp: int, overwrite: bool = False) -> Path:
    """A step-0 training checkpoint (zero Adam moments) holding consolidated weights."""
    from megallama.checkpoint.consolidated import load_consolidated

    cfg, state = load_consolidated(src)
    return from_state(cfg, state, out, tp, pp, overwrite=overwrite)


def from_state(cfg: ModelConfig, state, out, tp: int, pp: int, overwrite: bool = False, moments=None,
               step: int = 0, consumed_samples: int = 0) -> Path:
    """A training checkpoint at ``step`` from full weights and (else zero) Adam ``moments``
    (``{"exp_avg": state, "exp_avg_sq": state}``), e.g. another harness's run to continue."""
    from megallama.checkpoint.universal_write import with_moments, write_training_checkpoint

    out = Path(out)
    _check_target(cfg, out, tp, pp, overwrite)
    return write_training_checkpoint(out, cfg, with_moments(state, moments), step=step,
                                     consumed_samples=consumed_samples, tp=tp, pp=pp)
