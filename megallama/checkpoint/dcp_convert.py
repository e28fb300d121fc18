"""``megallama convert`` with torchtitan's DCP format on either side (:mod:`megallama.checkpoint.dcp`).

In: a DCP with Adam state becomes a layout-free training checkpoint (``megallama.train.universal``)
at its step, which ``checkpoint.load`` resumes at any layout; weights alone become consolidated or
Hugging Face weights. Out: any weights, and a training checkpoint's moments, step and LR-schedule
position as torchtitan's resume reads them (its ``dataloader`` entry is not ours to write: resume
there with ``checkpoint.exclude_from_loading = ["dataloader"]``). Both directions stream.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from megallama.checkpoint.dcp import _LAST, MOMENTS, OPT, Lazy, TitanCheckpoint, _whole, save_titan, to_titan
from megallama.errors import UserError

CONSUMED = "train_state.consumed_samples"  # our data position; torchtitan loads only the keys it asks for


def optimizer_values(names: Mapping[str, Tuple[int, ...]], step: int, consumed: int, schedule: Optional[Dict]
                     ) -> Dict:
    """What torchtitan's resume reads besides tensors: each parameter's Adam hyper-parameters
    (megallama's: norms undecayed) as this torch's AdamW names them, the LR schedule's position
    (a ``LambdaLR`` at ``step``) and ``train_state``."""
    from pydantic import ValidationError

    from megallama.config.schema import TrainConfig
    from megallama.train.optim import lr_lambda

    try:
        t = TrainConfig.model_validate(schedule or {})
    except (ValidationError, ValueError):
        t = TrainConfig()
    factor = lr_lambda(t)(step)

    def adam(weight_decay: float):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.lr, betas=(t.beta1, t.beta2),
                                eps=t.eps, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        sched.last_epoch, sched._step_count = step, step + 1
        sched._last_lr = [t.lr * factor]
        opt.param_groups[0]["lr"] = t.lr * factor
        return {k: v for k, v in opt.param_groups[0].items() if k != "params"}, sched.state_dict()

    groups = {2: adam(t.weight_decay)[0], 1: adam(0.0)[0]}
    values = {f"optimizer.param_groups.{n}.{k}": v for n, shape in names.items()
              for k, v in groups[min(len(shape), 2)].items()}
    values.update({f"lr_scheduler.{k}": v for k, v in adam(t.weight_decay)[1].items()})
    values.update({"train_state.step": step, "train_state.ntokens_seen": 0, CONSUMED: consumed})
    return values


# ------------------------------------------------------------------------------- convert
def export(inp: Path, out: Path, args, load) -> int:
    """``convert --to dcp``: weights of any input; a training checkpoint's Adam moments and step too."""
    from megallama.checkpoint.consolidated import expected_shapes, is_consolidated

    if args.tp is not None or args.pp is not None:
        raise UserError("--tp/--pp: a DCP checkpoint is unsharded here; DCP reshards it for any layout on load")
    if args.shard_size is not None or args.tokenizer or args.params:
        raise UserError("--shard-size/--tokenizer/--params: not used by a DCP output")
    training = args.from_format == "megallama" and not is_consolidated(inp)
    if training and args.dtype != "keep":
        raise UserError("--dtype: a training checkpoint's export keeps fp32 weights beside its Adam moments")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if not training:
        cfg, state = load(args.from_format, inp, False)
        if args.dtype != "keep":
            from megallama.checkpoint.pretrained import resolve_dtype

            state = {k: v.to(resolve_dtype(args.dtype)) for k, v in state.items()}
        if cfg.arch != "decoder" or not ({"output.weight", "tok_embeddings.weight"} <= set(state)
                                         or cfg.tie_embeddings):
            raise UserError(f"{inp}: not a LLaMA language model (an encoder-decoder or a classifier); torchtitan's "
                            "LLaMA names have no place for it")
        tensors, values = to_titan(state, cfg), {}
    else:
        from megallama.checkpoint.reshard import resolve_checkpoint
        from megallama.train.checkpoint import read_meta
        from megallama.train.universal import UniversalReader

        tag = resolve_checkpoint(inp)
        reader, meta = UniversalReader(tag / "universal"), read_meta(tag)
        cfg = reader.cfg
        if cfg.arch != "decoder":
            raise UserError(f"{inp}: an encoder-decoder model; torchtitan's LLaMA names have no place for it")
        shapes = expected_shapes(cfg, str(tag))

        def full(name: str, key: Optional[str] = None) -> Lazy:
            return _whole(("universal", name, key), shapes[name], torch.float32, lambda: reader.full(name, key))

        tensors = to_titan({n: full(n) for n in reader.names()}, cfg)
        titan_shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        for m in MOMENTS:
            tensors.update({OPT + k: v for k, v in to_titan({n: full(n, m) for n in reader.names()}, cfg,
                                                            "." + m).items()})
        tensors.update({f"{OPT}{n}.step": torch.tensor(float(meta["step"])) for n in titan_shapes})
        values = optimizer_values(titan_shapes, meta["step"], meta["consumed_samples"], meta.get("schedule"))
    save_titan(out, tensors, values, cfg)
    n = sum(math.prod(t.shape) for k, t in tensors.items() if not k.startswith("optimizer."))
    print(f"{out}: dcp checkpoint (torchtitan names), {n:,} parameters"
          f"{', Adam moments and step ' + str(values['train_state.step']) if values else ''}, from "
          f"{args.from_format} {inp}")
    return 0


def import_(inp: Path, out: Path, args) -> int:
    """``convert --from dcp``: a training checkpoint (``checkpoint.load`` resumes it at its step)
    when the DCP holds Adam state or --tp/--pp asks for one; else consolidated or Hugging Face weights."""
    ck = TitanCheckpoint(inp, args.params)
    to_hf = args.to_format == "hf"
    training = not to_hf and (ck.has_optimizer or args.tp is not None or args.pp is not None)
    if to_hf and (args.tp is not None or args.pp is not None):
        raise UserError("--tp/--pp: a Hugging Face export is unsharded; they set the layout of a training checkpoint")
    if args.shard_size is not None and not to_hf:
        raise UserError("--shard-size: only a Hugging Face output (--to hf) is split into files")
    if training and (args.dtype != "keep" or args.tokenizer):
        raise UserError("--dtype/--tokenizer: the output is a training checkpoint (the DCP holds Adam state, or "
                        "--tp/--pp): fp32, no tokenizer; convert that one to hf or a consolidated copy")
    if training and (args.tp or args.pp):
        from megallama.config import layout_rules

        problem = layout_rules.layout_problem(ck.cfg.shape, args.tp or 1, args.pp or 1)
        if problem:
            raise UserError(f"--tp/--pp: {problem}")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    try:
        if training:
            write_training(ck, out, args.tp or 1, args.pp or 1)
        else:
            _write_weights(ck, out, args, to_hf)
    finally:
        _LAST[:] = [None, None]
    print(f"{out}: {'training' if training else args.to_format} checkpoint, {ck.cfg.n_layers} layers, from dcp "
          f"{inp}" + (f" at step {ck.step()}" if training else ""))
    return 0


def _write_weights(ck: TitanCheckpoint, out: Path, args, to_hf: bool) -> None:
    from megallama.checkpoint.streaming import parse_size

    state = ck.weights()
    if args.dtype != "keep":
        from megallama.checkpoint.pretrained import resolve_dtype

        state = {k: v.to(resolve_dtype(args.dtype)) for k, v in state.items()}
    tokenizer = None
    if args.tokenizer:
        from megallama.checkpoint.hf_tokenizer import load_for_export

        tokenizer = load_for_export(args.tokenizer, ck.cfg.vocab_size)
    if to_hf:
        from megallama.checkpoint.hf import save_hf

        shard = parse_size(args.shard_size) if args.shard_size is not None else None
        save_hf(state, ck.cfg, out, overwrite=True, tokenizer=tokenizer, max_shard_bytes=shard)
        return
    from megallama.checkpoint.consolidated import save_consolidated

    save_consolidated(state, ck.cfg, out, overwrite=True,
                      extra={"converted_from": {"format": "dcp", "path": str(ck.path)}})
    if tokenizer is not None:
        shutil.copyfile(tokenizer.path, out / tokenizer.FILE_NAME)


def write_training(ck: TitanCheckpoint, out: Path, tp: int, pp: int) -> None:
    """A training checkpoint at ``tp`` x ``pp`` holding the DCP's weights, its Adam moments (zeros
    without them), step and data position, streamed tensor by tensor."""
    from megallama.checkpoint.universal_write import with_moments, write_training_checkpoint

    step = ck.step()
    consumed = ck.reader.load_value(CONSUMED) or 0
    if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
        raise UserError(f"{ck.path}: {CONSUMED} must be a non-negative integer, got {consumed!r:.40}")
    moments = {m: ck.moments(m) for m in MOMENTS} if ck.has_optimizer else None
    write_training_checkpoint(out, ck.cfg, with_moments(ck.weights(), moments), step=step, consumed_samples=consumed,
                              source=("dcp", ck.path), tp=tp, pp=pp)


def convert(args, load) -> int:
    """``megallama convert`` with ``dcp`` on either side (``load``: convert's reader of other formats)."""
    inp, out = Path(args.input), Path(args.output)
    if args.from_format == "dcp" and args.to_format == "dcp":
        raise UserError("--from dcp --to dcp: nothing to convert; DCP reshards on load")
    if args.from_format == "dcp":
        return import_(inp, out, args)
    return export(inp, out, args, load)
