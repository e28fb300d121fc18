"""``megallama generate --checkpoint DIR --prompt TEXT``: text from a checkpoint, on one process
or tensor-parallel under a launcher (``torchrun --nproc_per_node 2 -m megallama generate ...``).
For an encoder-decoder the prompt is the source (encoded once, ending in ``</s>`` as in
training; ``<extra_id_K>`` writes span-corruption sentinel K) and the output is the target."""
from __future__ import annotations

import json
import sys
import time

NAME = "generate"
HELP = "generate text from a checkpoint (greedy or seeded temperature/top-p sampling, KV cache, TP-aware)"


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="consolidated, Hugging Face, Meta or training checkpoint dir")
    p.add_argument("--tokenizer", help="tokenizer file: SentencePiece or tiktoken tokenizer.model, or tokenizer.json "
                   "(default: the one in CHECKPOINT; for a training checkpoint, the one its run recorded)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same tokens at any TP")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's dtype (float32 on CPU for half precision)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _check_args(args) -> None:
    import math

    from megallama.errors import UserError

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: expected a non-negative integer, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature: expected a finite value >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p: expected a value in (0, 1], got {args.top_p}")


def _load(args, world_size: int, tag=None):
    """The checkpoint's model and weights (``tag``: a training checkpoint's verified step
    directory), refused before any process group starts if they cannot generate over
    ``world_size`` tensor-parallel ranks."""
    from megallama.checkpoint.pretrained import load_checkpoint
    from megallama.config.layout_rules import tp_problem
    from megallama.errors import UserError

    cfg, weights, _ = load_checkpoint(tag or args.checkpoint, resolved=tag is not None)
    if "score.weight" in weights:
        raise UserError(f"{args.checkpoint}: a fine-tuned classifier (no language-model head) cannot generate text")
    problem = tp_problem(cfg.shape, world_size)
    if problem:
        raise UserError(f"{args.checkpoint}: over the {world_size} launched ranks: {problem}")
    return cfg, weights


def run(args) -> int:
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from megallama.checkpoint.pretrained import build_for_inference, resolve_dtype, verified_with_tokenizer
    from megallama.commands._stdout import logs_to_stderr
    from megallama.data.tokenizer import Tokenizer
    from megallama.errors import UserError
    from megallama.inference import generate, generate_seq2seq
    from megallama.train.distributed import detect_launcher
    from megallama.train.fits import check_inference_fits
    from megallama.train.runtime import inference_config, start

    _check_args(args)
    # a missing directory fails before any process group starts; a training checkpoint is verified
    # once, and its run's tokenizer (recorded in meta.json) is the default
    tag, tok_path = verified_with_tokenizer(args.checkpoint, args.tokenizer)
    tok_path = tok_path or Path(args.checkpoint) / "tokenizer.model"
    if not Path(tok_path).is_file():
        raise UserError(f"{tok_path}: tokenizer model not found" +
                        ("" if args.tokenizer else " (pass --tokenizer)"))
    with logs_to_stderr():  # stdout carries the text (or --json) alone
        tokenizer = Tokenizer(tok_path)
        info = detect_launcher()
        cfg, weights = _load(args, info.world_size, tag)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"{tok_path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                            f"is {cfg.vocab_size}")
        try:
            rt = start(inference_config(cfg, info.world_size), info, training=False)  # TP over every launched rank
            state, device = rt.state, rt.device
            dtype = None if args.dtype == "auto" else args.dtype
            ckpt_dtype = next(iter(weights.values())).dtype
            if dtype is None and device.type == "cpu" and ckpt_dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            check_inference_fits(cfg, state.tp, len(args.prompt), args.max_new_tokens + 1 + max(  # tokens <= bytes + BOS
                len(p.encode()) for p in args.prompt), resolve_dtype(dtype) or ckpt_dtype, state.world_size,
                device.index or 0, kv_cache=not args.no_kv_cache, batch_flag="--prompt")
            model = build_for_inference(cfg, weights, dtype, device, where=args.checkpoint, parallel=state)
            del weights
            eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
            start_time = time.perf_counter()
            if cfg.arch == "encoder_decoder":
                from megallama.data.span_corruption import encode_with_sentinels

                prompts = [encode_with_sentinels(tokenizer, text) + [tokenizer.eos_id] for text in args.prompt]
                _check_seq2seq_lengths(args, cfg, tokenizer, prompts)
                result = generate_seq2seq(model, prompts, args.max_new_tokens, tokenizer.bos_id, eos,
                                          args.temperature, args.top_p, args.seed, use_cache=not args.no_kv_cache)
            else:
                prompts = [tokenizer.encode(text, bos=True) for text in args.prompt]
                longest = max(len(p) for p in prompts) + args.max_new_tokens
                if longest > cfg.max_seq_len:
                    raise UserError(f"--max-new-tokens: prompt ({longest - args.max_new_tokens} tokens) + "
                                    f"{args.max_new_tokens} new tokens exceed the model's max_seq_len={cfg.max_seq_len}")
                result = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                  eos_id=eos, use_cache=not args.no_kv_cache)
            seconds = time.perf_counter() - start_time
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    if state.rank == 0:
        _report(args, tokenizer, prompts, result, seconds, state.tp, cfg.arch == "encoder_decoder")
    return 0


def _check_seq2seq_lengths(args, cfg, tokenizer, sources) -> None:
    from megallama.errors import UserError

    if tokenizer.bos_id < 0:
        raise UserError(f"{tokenizer.path}: an encoder-decoder starts decoding at BOS and this tokenizer has none")
    if max(len(s) for s in sources) > cfg.max_seq_len:
        raise UserError(f"--prompt: {max(len(s) for s in sources)} source tokens exceed the model's "
                        f"max_seq_len={cfg.max_seq_len}")
    if args.max_new_tokens + 1 > cfg.max_seq_len:
        raise UserError(f"--max-new-tokens: {args.max_new_tokens} + the start token exceed the model's "
                        f"max_seq_len={cfg.max_seq_len}")


def _completion(tokenizer, prompt_ids, new_ids) -> str:
    """The continuation's text as it reads after the prompt (SentencePiece drops a leading space
    when a piece list is decoded on its own)."""
    full, prefix = tokenizer.decode(prompt_ids + new_ids), tokenizer.decode(prompt_ids)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(new_ids)


def _report(args, tokenizer, prompts, result, seconds: float, tp: int, seq2seq: bool = False) -> None:
    """Decoder: the prompt and its continuation; encoder-decoder: the generated target alone."""
    from megallama.data.span_corruption import decode_with_sentinels

    n_new = sum(len(t) for t in result.tokens)
    rows = [dict(prompt=text, completion=decode_with_sentinels(tokenizer, t) if seq2seq else
                 _completion(tokenizer, ids, t),
                 new_tokens=t, finish=f)
            for text, ids, t, f in zip(args.prompt, prompts, result.tokens, result.finish)]
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), tp=tp, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, results=rows, seconds=round(seconds, 4),
                              tokens_per_s=round(n_new / seconds, 2) if seconds > 0 else None)))
        return
    for row in rows:
        print(row["completion"] if seq2seq else row["prompt"] + row["completion"])
    sys.stderr.write(f"{n_new} new tokens in {seconds:.2f} s ({n_new / max(seconds, 1e-9):.1f} tok/s, TP={tp})\n")
