"""``megallama convert --from megatron`` / ``--to megatron``.

From Megatron (legacy per-rank files or megatron-core's ``torch_dist`` directory): weights alone become a consolidated checkpoint; with Adam state in the files, a
training checkpoint at the Megatron iteration (fp32 masters and moments) that ``checkpoint.load``
resumes. To Megatron: the legacy per-rank form at ``--tp``/``--pp`` (default 1/1) that Megatron's
loader reads (megatron-core local-spec names), with the optimizer when a training checkpoint is
converted (``--distributed-optimizer``: as the distributed optimizer saves it, ``distrib_optim.pt``
files, or torch_dist's ``fully_reshardable`` form).
A Megatron checkpoint can also be re-laid out (``--from megatron --to megatron``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megallama.errors import UserError


def _refuse_flags(args) -> None:
    if args.shard_size is not None:
        raise UserError("--shard-size: only a Hugging Face output (--to hf) is split into files")
    if args.to_format not in ("megatron", "megallama"):
        raise UserError(f"--to {args.to_format}: a Megatron checkpoint converts to megallama (or megatron); convert "
                        "the consolidated result onwards")
    if args.to_format != "megatron" and (args.tp is not None or args.pp is not None):
        raise UserError("--tp/--pp: only for megallama checkpoints; import with --to megallama first, then "
                        "reshard the consolidated result")
    if args.to_format == "megatron" and args.tokenizer:
        raise UserError("--tokenizer: a Megatron checkpoint carries no tokenizer file")


def _read(args, inp: Path):
    """``(cfg, weights, optimizer or None, iteration, consumed samples)`` of the input."""
    if args.from_format == "megatron":
        import sys

        from megallama.checkpoint.megatron_dist import TorchDistCheckpoint, open_megatron

        ck = open_megatron(inp)
        if isinstance(ck, TorchDistCheckpoint):
            if ck.not_read:
                print(ck.not_read, file=sys.stderr)
        elif ck.distributed and not ck.has_optimizer:
            print(f"{ck.dir}: args.use_distributed_optimizer is set but not every rank directory holds "
                  "distrib_optim.pt; converting the weights only", file=sys.stderr)
        return ck.cfg, ck.weights(), ck.optimizer(), ck.iteration, ck.consumed
    from megallama.checkpoint.consolidated import is_consolidated, open_consolidated

    if is_consolidated(inp):
        cfg, state = open_consolidated(inp)
        return cfg, state, None, 0, 0
    from megallama.checkpoint.reshard import resolve_checkpoint
    from megallama.train import checkpoint as ckpt
    from megallama.train.universal import MOMENTS, UniversalReader

    tag = resolve_checkpoint(inp)
    reader = UniversalReader(tag / "universal")
    masters, moments = _lazy(reader, None), {k: _lazy(reader, k) for k in MOMENTS}
    meta = ckpt.read_meta(tag)
    return reader.cfg, masters, (masters, moments), int(meta["step"]), int(meta.get("consumed_samples", 0))


def _lazy(reader, key):
    """A training checkpoint's tensors (or one moment) read when written: the last one read is kept,
    so a writer taking a tensor block by block reads it once and holds one tensor, not the state."""
    from megallama.checkpoint.consolidated import expected_shapes
    from megallama.checkpoint.streaming import Lazy

    last: list = [None, None]

    def reader_of(name):
        def read(a: int, b: int):
            if last[0] != name:
                last[:] = [None, None]
                last[:] = [name, reader.full(name, key)]
            return last[1][a:b]
        return read
    shapes = expected_shapes(reader.cfg, str(reader.src))
    return {n: Lazy(shapes[n], torch.float32, reader_of(n)) for n in reader.names()}


def run(args, inp: Path, out: Path) -> int:
    _refuse_flags(args)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    from megallama.checkpoint.pretrained import resolve_dtype

    dtype = resolve_dtype(args.dtype) if args.dtype != "keep" else None
    cfg, state, optimizer, step, consumed = _read(args, inp)
    if args.to_format == "megatron":
        tp, pp = args.tp or 1, args.pp or 1
        if args.distributed_optimizer and optimizer is None:
            raise UserError("--distributed-optimizer: the input holds no Adam state to write (a training "
                            "checkpoint or a Megatron one with its optimizer does)")
        if args.megatron_format == "torch_dist":
            from megallama.checkpoint.megatron_dist_write import save_torch_dist

            if args.pp is not None:
                raise UserError("--pp: a torch_dist checkpoint holds global tensors; megatron-core loads it at any "
                                "pipeline split (--tp sets its vocabulary padding)")
            save_torch_dist(state, cfg, out, tp, iteration=step, consumed=consumed, dtype=dtype, optimizer=optimizer,
                            distributed=args.distributed_optimizer)
        else:
            from megallama.checkpoint.megatron_write import save_megatron

            save_megatron(state, cfg, out, tp, pp, iteration=step, consumed=consumed, dtype=dtype,
                          optimizer=optimizer, distributed=args.distributed_optimizer)
        what = (f"Megatron {args.megatron_format or 'legacy'} checkpoint at tp={tp} pp={pp}, iteration {step}"
                + (" with Adam state" if optimizer else "")
                + (" (distributed optimizer: distrib_optim.pt)" if args.distributed_optimizer else ""))
    elif optimizer is not None:
        if dtype is not None:
            raise UserError("--dtype: a checkpoint with Adam state becomes a training checkpoint, which keeps fp32 "
                            "master weights and moments")
        from megallama.checkpoint.reshard import from_state

        masters, moments = optimizer
        from_state(cfg, masters, out, 1, 1, overwrite=True, moments=moments, step=step, consumed_samples=consumed)
        what = f"training checkpoint at step {step} with Adam state; train from it with --set checkpoint.load={out}"
    else:
        from megallama.checkpoint.consolidated import save_consolidated

        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        save_consolidated(state, cfg, out, overwrite=True, extra={"converted_from": {"format": "megatron",
                                                                                      "path": str(inp)}})
        if args.tokenizer:
            import shutil

            from megallama.checkpoint.hf_tokenizer import load_for_export

            tok = load_for_export(args.tokenizer, cfg.vocab_size)
            shutil.copyfile(tok.path, out / tok.FILE_NAME)
        what = "consolidated checkpoint"
    n = sum(t.numel() for t in state.values())
    print(f"{out}: {what}, {n:,} parameters, from {args.from_format} {inp}")
    return 0
