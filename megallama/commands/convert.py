"""``megallama convert``: move weights between formats, through the layout-free consolidated form.

  --from hf|meta --to megallama     import (Hugging Face safetensors / Meta's original release)
  --from megallama --to hf          export a consolidated checkpoint for transformers
  --from megallama --tp N --pp M    reshard a training checkpoint (megallama.checkpoint.reshard)
"""
from __future__ import annotations

NAME = "convert"
HELP = "convert checkpoints: Hugging Face / Meta <-> megallama, and training-checkpoint resharding"


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="checkpoint directory to read")
    p.add_argument("--output", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--from", dest="from_format", default="megallama", choices=["megallama", "hf", "meta"],
                   help="input format (default: megallama: a consolidated or training checkpoint)")
    p.add_argument("--to", dest="to_format", default="megallama", choices=["megallama", "hf"],
                   help="output format (default: megallama)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the output (training layout)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree of the output (training layout)")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="cast the weights (default: keep the input's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _reshard(args) -> int:
    """Training checkpoints (and consolidated -> a TP/PP layout) belong to the resharding tools."""
    from megallama.errors import UserError

    try:
        from megallama.checkpoint.reshard import convert_training_checkpoint
    except ImportError as exc:
        if getattr(exc, "name", None) not in (None, "megallama.checkpoint.reshard"):
            raise
        raise UserError(f"{args.input}: not a consolidated checkpoint; converting training checkpoints "
                        "(--tp/--pp resharding) is not yet supported") from None
    return int(convert_training_checkpoint(args) or 0)


def run(args) -> int:
    from pathlib import Path

    from megallama.errors import UserError

    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        raise UserError(f"{inp}: not found")
    if not inp.is_dir():
        raise UserError(f"{inp}: not a checkpoint directory")
    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if out.resolve() == inp.resolve() or out.resolve() in inp.resolve().parents:
        raise UserError(f"{out}: --output must differ from --input and not hold it (it would be replaced)")
    from megallama.checkpoint.consolidated import is_consolidated

    layout = (args.tp, args.pp) != (1, 1)
    if args.from_format == "megallama" and (layout or not is_consolidated(inp)):
        return _reshard(args)
    if layout:
        raise UserError("--tp/--pp: only for megallama checkpoints; import with --to megallama first, then "
                        "reshard the consolidated result")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    cfg, state = _load(args.from_format, inp)
    if args.dtype != "keep":
        from megallama.checkpoint.pretrained import resolve_dtype

        dtype = resolve_dtype(args.dtype)
        state = {k: v.to(dtype) for k, v in state.items()}
    tokenizer = inp / "tokenizer.model"
    if args.to_format == "hf":
        from megallama.checkpoint.hf import save_hf

        save_hf(state, cfg, out, overwrite=True, tokenizer=tokenizer)
    else:
        import shutil

        from megallama.checkpoint.consolidated import save_consolidated

        save_consolidated(state, cfg, out, overwrite=True,
                          extra={"converted_from": {"format": args.from_format, "path": str(inp)}})
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, out / "tokenizer.model")
    n = sum(t.numel() for t in state.values())
    dtype = next(iter(state.values())).dtype
    print(f"{out}: {args.to_format} checkpoint, {n:,} parameters ({str(dtype).replace('torch.', '')}), "
          f"from {args.from_format} {inp}")
    return 0


def _load(fmt: str, path):
    if fmt == "hf":
        from megallama.checkpoint.hf import load_hf

        return load_hf(path)
    if fmt == "meta":
        from megallama.checkpoint.meta import load_meta

        return load_meta(path)
    from megallama.checkpoint.consolidated import load_consolidated

    return load_consolidated(path)
