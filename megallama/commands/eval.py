"""``megallama eval``: perplexity of a checkpoint on a split of the run's data or on token files
(an encoder-decoder: on its run config's data, per target token)."""
from __future__ import annotations

import json
import sys

NAME = "eval"
HELP = "perplexity of a checkpoint (any layout) on a validation split or on given token files"


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="training, consolidated, Hugging Face or Meta checkpoint")
    p.add_argument("--config", help="run config whose data (and split) to evaluate on")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", nargs="+", metavar="PREFIX", help="Megatron .bin/.idx prefixes to evaluate instead")
    p.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's train.seq_len, else 256")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (world size must be a multiple)")
    p.add_argument("--json", action="store_true")


def _run_config(args, model_cfg):
    """The run config whose data to evaluate on (``--config``), under the checkpoint's model; None with ``--data``."""
    from megallama.config import load_run_config
    from megallama.errors import UserError

    if args.data and model_cfg.arch == "encoder_decoder":
        raise UserError("--data: an encoder-decoder checkpoint evaluates on a run config's data (--config), which "
                        "names the tokenizer its source/target or span-corruption samples need")
    if args.data:
        return None
    if not args.config:
        raise UserError("--config or --data: say what to evaluate on")
    overrides = list(args.overrides) + ([f"train.seq_len={args.seq_len}"] if args.seq_len else [])
    cfg = load_run_config(args.config, overrides)
    if cfg.train.seq_len > model_cfg.max_seq_len:
        raise UserError(f"train.seq_len: {cfg.train.seq_len} exceeds the checkpoint's max_seq_len="
                        f"{model_cfg.max_seq_len} (pass a shorter --seq-len)")
    return cfg.model_copy(update={"model": model_cfg})


def _dataset(args, model_cfg, run_cfg):
    if run_cfg is None:
        return _files(args, model_cfg)
    from megallama.train.runtime import open_datasets

    train, valid, test = open_datasets(run_cfg)
    return {"train": train, "valid": valid, "test": test}[args.split], args.split, run_cfg.train.seq_len


def _files(args, model_cfg):
    from megallama.data import IndexedTokens
    from megallama.data.packing import PackedDataset
    from megallama.errors import UserError

    seq = args.seq_len or min(256, model_cfg.max_seq_len - 1)
    files = [IndexedTokens(p) for p in args.data]
    for ids in files:
        top = ids.max_token_id()
        if top >= model_cfg.vocab_size:
            raise UserError(f"{ids.bin_path}: token id {top} is outside the model's vocabulary "
                            f"(vocab_size {model_cfg.vocab_size}); the files were made with another tokenizer")
    sets = [PackedDataset(ids, (0, len(ids)), seq) for ids in files]
    if len(sets) > 1:
        from megallama.data import BlendedDataset

        return BlendedDataset(sets, [float(len(s)) for s in sets], seed=(0,)), "files", seq
    return sets[0], "files", seq


def run(args) -> int:
    from megallama.commands._stdout import logs_to_stderr

    with logs_to_stderr():  # stdout carries the result alone (--json is read by pipes)
        result, rank = _evaluate(args)
    if rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            sys.stdout.write(f"{result['split']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
                             f"over {result['tokens']:,} tokens ({result['samples']} samples)\n")
    return 0


def _evaluate(args):
    import torch

    from megallama.checkpoint.pretrained import build_for_inference, load_checkpoint
    from megallama.errors import UserError
    from megallama.train.distributed import detect_launcher, finish_distributed
    from megallama.train.evaluate import perplexity
    from megallama.train.fits import check_inference_fits
    from megallama.train.runtime import inference_config, start
    from megallama.train.step import make_loss_fn

    for flag, value in (("--tp", args.tp), ("--micro-batch-size", args.micro_batch_size),
                        ("--seq-len", args.seq_len), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    info = detect_launcher()
    if info.world_size % args.tp:
        raise UserError(f"--tp: world size {info.world_size} is not a multiple of {args.tp}")
    model_cfg, state_dict, kind = load_checkpoint(args.checkpoint)
    if "score.weight" in state_dict:
        raise UserError(f"{args.checkpoint}: a fine-tuned classifier (no language-model head); eval measures "
                        "perplexity: judge it by finetune's held-out accuracy or load it with from_pretrained")
    if args.seq_len is not None and args.seq_len > model_cfg.max_seq_len:
        raise UserError(f"--seq-len: {args.seq_len} exceeds the checkpoint's max_seq_len={model_cfg.max_seq_len}")
    run_cfg = _run_config(args, model_cfg)
    timeout = run_cfg.train.dist_timeout_s if run_cfg else None
    rt = start(inference_config(model_cfg, args.tp, timeout), info, training=False)
    check_inference_fits(model_cfg, args.tp, args.micro_batch_size, args.seq_len or 256, torch.float32,
                         info.world_size, info.local_rank)
    model = build_for_inference(model_cfg, state_dict, dtype=torch.float32, device=rt.device, where=args.checkpoint,
                                parallel=rt.state)
    dataset, split, seq_len = _dataset(args, model_cfg, run_cfg)
    if len(dataset) == 0:
        raise UserError(f"--split {split}: no samples of {getattr(dataset, 'seq_len', '?')}+1 tokens there "
                        "(give that split a larger data.split share, or shorten --seq-len)")
    result = perplexity(model, dataset, args.micro_batch_size, rt.device, rt.state, args.max_samples,
                        loss_fn=make_loss_fn(model_cfg.arch, seq_len))
    result.update(split=split, checkpoint=str(args.checkpoint), kind=kind, tp=rt.state.tp, dp=rt.state.dp)
    finish_distributed()
    return result, info.rank
