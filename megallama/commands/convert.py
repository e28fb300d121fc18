"""``megallama convert``: move weights between formats, through the layout-free consolidated form.

  --from hf|meta --to megallama     import (Hugging Face safetensors / Meta's original release)
  --from megallama --to hf          export a consolidated or training checkpoint for transformers
  --from megallama --tp N --pp M    a training checkpoint at a new layout (megallama.checkpoint.reshard)
  --from dcp / --to dcp             torchtitan's torch.distributed.checkpoint, Adam state included
  --from ds-universal               DeepSpeed's ds_to_universal output -> a training checkpoint (Adam moments too)
  --from/--to megatron              Megatron-LM's legacy per-rank and megatron-core's torch_dist checkpoints
                                    (--format torch_dist; megallama.checkpoint.megatron*)

Every flag either takes effect or is refused in one line: a training-checkpoint output keeps fp32
master weights and Adam moments (no --dtype), a Hugging Face or consolidated output is
unsharded (no --tp/--pp), and only a Hugging Face output is split into files (--shard-size).
Hugging Face and consolidated inputs stream tensor by tensor (megallama.checkpoint.streaming):
peak memory stays near the largest tensor, not the model. A training checkpoint exported without
--tokenizer takes its run's data.tokenizer (recorded in meta.json), refused in one line if gone.
"""
from __future__ import annotations

NAME = "convert"
HELP = "convert checkpoints: Hugging Face / Meta <-> megallama, and training-checkpoint resharding"


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="checkpoint directory to read (a run's checkpoints/ dir uses the "
                   "step 'latest' names, and refuses to fall back to another; pass a stepNNNNNNNN dir to pick one)")
    p.add_argument("--output", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--from", dest="from_format", default="megallama",
                   choices=["megallama", "hf", "meta", "dcp", "ds-universal", "megatron"],
                   help="input format (default: megallama: a consolidated or training checkpoint)")
    p.add_argument("--to", dest="to_format", default="megallama", choices=["megallama", "hf", "dcp", "megatron"],
                   help="output format (default: megallama)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree of a training-checkpoint output")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree of a training-checkpoint output")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="cast the weights of a Hugging Face or consolidated output (default: keep the input's)")
    p.add_argument("--tokenizer", help="tokenizer file written with the output (default: --input's tokenizer.model "
                   "or tokenizer.json, else a training checkpoint's recorded data.tokenizer, if any); with --to hf "
                   "also tokenizer_config.json, special_tokens_map.json and generation_config.json")
    p.add_argument("--shard-size", default=None, help="largest safetensors file of a Hugging Face output, e.g. 5GB, "
                   "500MB, 2GiB (default 5GB, the Hub's Llama shards); a larger single tensor gets its own file")
    p.add_argument("--params", help="model args of a --from dcp input as JSON (torchtitan's: dim, n_layers, n_heads, "
                   "n_kv_heads, ...; default: INPUT/params.json, which --to dcp writes)")
    p.add_argument("--format", dest="megatron_format", default=None, choices=["legacy", "torch_dist"],
                   help="form of a --to megatron output: legacy per-rank files (default) or megatron-core's "
                   "torch_dist directory")
    p.add_argument("--distributed-optimizer", action="store_true", help="a --to megatron output keeps Adam state as "
                   "Megatron's --use-distributed-optimizer saves it (legacy: distrib_optim.pt per rank; torch_dist: "
                   "its fully_reshardable form)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _output_kind(args, training_input: bool) -> str:
    """'hf', 'consolidated' or 'training'; refuses a flag the chosen output cannot honour."""
    from megallama.errors import UserError

    layout = args.tp is not None or args.pp is not None
    if args.shard_size is not None and args.to_format != "hf":
        raise UserError("--shard-size: only a Hugging Face output (--to hf) is split into files")
    if args.to_format == "hf":
        if layout:
            raise UserError("--tp/--pp: a Hugging Face export is unsharded; they set the layout of a training "
                            "checkpoint (--to megallama)")
        return "hf"
    if args.from_format != "megallama" and layout:
        raise UserError("--tp/--pp: only for megallama checkpoints; import with --to megallama first, then "
                        "reshard the consolidated result")
    kind = "training" if layout or training_input else "consolidated"
    if kind == "training" and args.dtype != "keep":
        raise UserError("--dtype: a training checkpoint keeps fp32 master weights and Adam moments; --dtype "
                        "applies to --to hf or an unsharded (consolidated) output")
    return kind


def run(args) -> int:
    from pathlib import Path

    from megallama.checkpoint.consolidated import is_consolidated
    from megallama.errors import UserError

    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        raise UserError(f"{inp}: not found")
    if not inp.is_dir():
        raise UserError(f"{inp}: not a checkpoint directory")
    for name in ("tp", "pp"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name}: expected a positive integer, got {value}")
    if out.resolve() == inp.resolve() or out.resolve() in inp.resolve().parents:
        raise UserError(f"{out}: --output must differ from --input and not hold it (it would be replaced)")
    if (args.megatron_format or args.distributed_optimizer) and args.to_format != "megatron":
        raise UserError(f"--{'format' if args.megatron_format else 'distributed-optimizer'}: only for a --to "
                        "megatron output")
    formats = {args.from_format, args.to_format}
    if {"dcp", "megatron"} <= formats or (args.to_format == "megatron"
                                           and args.from_format not in ("megallama", "megatron")):
        raise UserError(f"--from {args.from_format} --to {args.to_format}: convert to megallama first, then from it")
    if "dcp" in formats:  # torchtitan's format: megallama.checkpoint.dcp
        from megallama.checkpoint.dcp_convert import convert

        return convert(args, _load)
    if args.params:
        raise UserError("--params: only for a --from dcp input")
    if "megatron" in formats:  # Megatron's legacy per-rank checkpoints
        from megallama.checkpoint.megatron_convert import run as run_megatron

        return run_megatron(args, inp, out)
    training_input = args.from_format == "ds-universal" or (args.from_format == "megallama"
                                                            and not is_consolidated(inp))
    kind = _output_kind(args, training_input)
    from megallama.checkpoint.streaming import parse_size

    shard_bytes = parse_size(args.shard_size) if args.shard_size is not None else None
    if kind != "consolidated" and _is_classifier(inp):
        raise UserError(f"{inp}: a fine-tuned classifier converts only to a consolidated copy (--dtype); Hugging "
                        "Face and training checkpoints hold language models")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if kind == "training":
        if args.tokenizer:
            raise UserError("--tokenizer: a training checkpoint carries no tokenizer; it goes with --to hf or a "
                            "consolidated output")
        if args.from_format == "ds-universal":  # DeepSpeed's ds_to_universal output: weights and Adam moments
            from megallama.checkpoint.ds_universal import convert

            convert(inp, out, args.overwrite)
            return 0
        from megallama.checkpoint.reshard import convert_training_checkpoint

        return convert_training_checkpoint(inp, out, args.tp or 1, args.pp or 1, args.overwrite)
    from megallama.checkpoint.reshard import checkpoint_tokenizer, resolve_checkpoint

    # verified once: the weights and the recorded tokenizer are this step's
    tag = resolve_checkpoint(inp) if training_input and args.from_format == "megallama" else None
    tokenizer = args.tokenizer or checkpoint_tokenizer(inp, tag)
    cfg, state = _load(args.from_format, tag or inp, training_input)
    if tokenizer is not None:  # read and checked before anything is written
        from megallama.checkpoint.hf_tokenizer import load_for_export

        tokenizer = load_for_export(tokenizer, cfg.vocab_size)
    if args.dtype != "keep":
        from megallama.checkpoint.pretrained import resolve_dtype

        dtype = resolve_dtype(args.dtype)
        state = {k: v.to(dtype) for k, v in state.items()}
    if kind == "hf":
        from megallama.checkpoint.hf import save_hf

        save_hf(state, cfg, out, overwrite=True, tokenizer=tokenizer,
                max_shard_bytes=shard_bytes)
    else:
        import shutil

        from megallama.checkpoint.consolidated import save_consolidated

        save_consolidated(state, cfg, out, overwrite=True,
                          extra={"converted_from": {"format": args.from_format, "path": str(inp)}})
        if tokenizer is not None:
            shutil.copyfile(tokenizer.path, out / tokenizer.FILE_NAME)
    n = sum(t.numel() for t in state.values())
    dtype = next(iter(state.values())).dtype
    print(f"{out}: {args.to_format} checkpoint, {n:,} parameters ({str(dtype).replace('torch.', '')}), "
          f"from {args.from_format} {inp}" + (f"; tokenizer {tokenizer.path}" if tokenizer is not None else ""))
    return 0


def _is_classifier(path) -> bool:
    import json

    from megallama.checkpoint.consolidated import CLASSIFIER_HEAD, CONFIG, is_consolidated

    return is_consolidated(path) and json.loads((path / CONFIG).read_text()).get("head") == CLASSIFIER_HEAD


def _load(fmt: str, path, training: bool):
    """``(config, state)``; lazy (read while writing) for Hugging Face and consolidated inputs
    (``training``: ``path`` is a step directory ``resolve_checkpoint`` verified)."""
    if fmt == "hf":
        from megallama.checkpoint.hf import open_hf

        return open_hf(path)
    if fmt == "ds-universal":
        from megallama.checkpoint.ds_universal import open_ds_universal

        return open_ds_universal(path)
    if fmt == "meta":
        from megallama.checkpoint.meta import load_meta

        return load_meta(path)
    if training:
        from megallama.checkpoint.reshard import consolidate_training_checkpoint

        return consolidate_training_checkpoint(path, resolved=True)
    from megallama.checkpoint.consolidated import open_consolidated

    return open_consolidated(path)
