"""``megallama preprocess``: text, JSONL or tables in, Megatron ``.bin``/``.idx`` token files out.

Inputs are local files or directories (:mod:`megallama.data.sources`: JSONL or text, plain, ``.gz``
or ``.zst``; parquet; arrow; a ``datasets`` ``save_to_disk`` directory) or ``-`` for standard
input; ``--filter FIELD=VALUE`` and ``--min-chars`` choose records (:mod:`megallama.data.filters`).

With ``--train-tokenizer`` it first trains a LLaMA-style SentencePiece model on the same inputs
and writes it to ``--tokenizer``; ``--output-prefix`` is then optional. Megatron's own flag
spellings (``--json-keys``, ``--tokenizer-model``, ``--append-eod``) are accepted too. Two JSON
keys (``--json-keys source target``) write an encoder-decoder's aligned ``PREFIX_source`` and
``PREFIX_target`` files.
"""
from __future__ import annotations

import os

from megallama.data.sources import FORMATS

NAME = "preprocess"
HELP = ("tokenize text/JSONL/parquet/arrow/datasets into Megatron .bin/.idx files (optionally train the "
        "tokenizer first)")
MAX_TOKENIZER_VOCAB = 2 ** 24  # 16.7M pieces: far past any LLaMA-family tokenizer (Llama 3: 128,256)


def add_arguments(parser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="local JSONL or text files (also .gz/.zst), parquet or arrow files, directories of "
                             "them, a datasets save_to_disk directory, or - for standard input (JSONL unless "
                             "--input-format text); never a hub name or URL")
    parser.add_argument("--output-prefix", metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", "--tokenizer-model", metavar="MODEL", required=True,
                        help="tokenizer file to use: SentencePiece or tiktoken tokenizer.model, or tokenizer.json "
                        "(or the SentencePiece model to write, with --train-tokenizer)")
    parser.add_argument("--text-field", "--json-key", "--json-keys", dest="json_key", nargs="+", default=["text"],
                        metavar="KEY", help="field (JSONL key or table column) holding the document text "
                        "(default: text); two keys (source target) write aligned PREFIX_source and "
                        "PREFIX_target files for an encoder-decoder")
    parser.add_argument("--input-format", choices=FORMATS, default="auto",
                        help="auto: by name (.jsonl/.json/.ndjson JSONL, .parquet, .arrow, a directory with a "
                             "state.json a datasets one, other files plain text; .gz/.zst looked through)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                        help="keep only records whose FIELD equals VALUE (repeatable: all must hold; numbers "
                             "and booleans as JSON writes them)")
    parser.add_argument("--min-chars", type=int, default=0, metavar="N",
                        help="drop documents whose text has fewer than N characters")
    parser.add_argument("--text-doc", choices=("line", "paragraph", "file"), default="line",
                        help="plain text: one document per non-blank line, blank-line paragraph, or file")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="encoding processes")
    parser.add_argument("--prepend-bos", action="store_true", help="start every document with <s>")
    parser.add_argument("--append-eod", action="store_true", help="accepted for Megatron compatibility; "
                        "</s> is always appended")
    parser.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    train = parser.add_argument_group("tokenizer training")
    train.add_argument("--train-tokenizer", action="store_true", help="train --tokenizer on the inputs first")
    train.add_argument("--vocab-size", type=int, help="vocabulary size of the trained tokenizer")
    train.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    train.add_argument("--character-coverage", type=float, default=None,
                       help="SentencePiece character coverage (default 0.99995, LLaMA's)")
    train.add_argument("--seed", type=int, default=0, help="sampling seed for tokenizer training")


class _Terminated(BaseException):
    """SIGTERM (a scheduler's stop, ``kill``) as an exception: the same clean-up as Ctrl-C runs
    on its way out (temporary ``.tmp-PID`` files removed, workers killed), where the default
    action would end the process on the spot and leave them."""


def _terminate(signum, frame):
    raise _Terminated()


def run(args) -> int:
    import signal
    import sys
    import threading

    from megallama.errors import UserError

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        return _run(args)
    except _Terminated:
        sys.stderr.write("megallama preprocess: terminated (SIGTERM); no partial output was left\n")
        return 128 + signal.SIGTERM
    except OSError as exc:  # unreadable input, unwritable output, disk full: one line, not a traceback
        if exc.filename is None:
            raise
        raise UserError(f"{exc.filename}: {exc.strerror or exc}") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    from megallama.data import sources
    from megallama.data.filters import parse_filters
    from megallama.data.indexed import normalize_prefix
    from megallama.data.records import InputSpec, iter_texts
    from megallama.data.tokenizer import Tokenizer, train_tokenizer
    from megallama.errors import UserError

    if args.workers < 1:
        raise UserError(f"--workers: expected a positive integer, got {args.workers}")
    keys = list(args.json_key)
    paired = len(keys) > 1
    record_filter = parse_filters(args.filter, args.min_chars)
    paths = sources.expand(args.input, args.input_format)
    if paired:
        from megallama.data.paired import check_keys

        check_keys(keys, args.skip_empty)
        _check_paired_inputs(paths, args.input_format, args.min_chars)
    if sources.STDIN in paths and args.train_tokenizer:
        raise UserError("--input -: standard input can be read once; not with --train-tokenizer (which reads the "
                        "inputs twice): save it to a file first")
    spec = InputSpec(paths, "jsonl" if paired else args.input_format, keys[0], args.text_doc, args.skip_empty,
                     record_filter)
    spec.check()
    if args.output_prefix:
        from megallama.data.files import refuse_existing
        from megallama.data.paired import pair_outputs

        prefix = normalize_prefix(args.output_prefix)
        outs = pair_outputs(prefix, keys) if paired else [prefix]
        refuse_existing([o + ext for o in outs for ext in (".bin", ".idx")], args.overwrite)  # before slow work
    if args.train_tokenizer:
        if not args.vocab_size or args.vocab_size < 1:
            raise UserError("--vocab-size: required with --train-tokenizer (e.g. 32000, LLaMA's)")
        if args.vocab_size > MAX_TOKENIZER_VOCAB:  # past it SentencePiece's int32 field overflows in a traceback
            raise UserError(f"--vocab-size: expected at most {MAX_TOKENIZER_VOCAB:,} (LLaMA's is 32,000), "
                            f"got {args.vocab_size}")
        import itertools
        from dataclasses import replace

        texts = itertools.chain.from_iterable(iter_texts(replace(spec, json_key=k)) for k in keys)
        tok = train_tokenizer(texts, args.tokenizer, args.vocab_size, overwrite=args.overwrite,
                              max_sentences=args.max_sentences, seed=args.seed,
                              character_coverage=args.character_coverage)
        print(f"wrote {tok.path}: {tok.vocab_size} tokens (BPE, byte fallback, digits split)")
        if not args.output_prefix:
            return 0
    elif not args.output_prefix:
        raise UserError("--output-prefix: required (or pass --train-tokenizer to only train a tokenizer)")
    else:
        tok = Tokenizer(args.tokenizer)
    if paired:
        return _run_paired(args, spec, keys, tok, prefix)
    from megallama.data.preprocess import preprocess

    stats = preprocess(spec, tok, args.output_prefix, workers=args.workers, bos=args.prepend_bos,
                       overwrite=args.overwrite, progress=False if args.no_progress else None)
    skipped = (f", {stats.skipped} empty skipped" if stats.skipped else "") + \
        (f", {stats.filtered} filtered out" if stats.filtered else "")
    print(f"wrote {prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens ({stats.dtype}){skipped}"
          f" in {stats.seconds:.1f}s: {stats.docs_per_s:,.0f} docs/s, {stats.tokens_per_s:,.0f} tokens/s")
    return 0


def _check_paired_inputs(paths, fmt: str, min_chars: int) -> None:
    """Two keys read the records once per key: JSONL files only, and no filter that differs per key."""
    from megallama.data import sources
    from megallama.errors import UserError

    for path in paths:
        kind = sources.format_of(path, fmt)
        if path == sources.STDIN or kind != "jsonl":
            what = "standard input" if path == sources.STDIN else kind
            raise UserError(f"{sources.display(path)}: two --json-keys read JSONL files (each twice), not {what}")
    if min_chars:
        raise UserError("--min-chars: not with two --json-keys (it would drop a record from one side only and "
                        "misalign the pairs)")


def _run_paired(args, spec, keys, tok, prefix) -> int:
    from megallama.data.paired import pair_outputs, preprocess_pairs

    stats = preprocess_pairs(spec, keys, tok, prefix, workers=args.workers, bos=args.prepend_bos,
                             overwrite=args.overwrite, progress=False if args.no_progress else None)
    for out, key, st in zip(pair_outputs(prefix, keys), keys, stats):
        print(f"wrote {out}.bin/.idx ('{key}'): {st.documents} documents, {st.tokens} tokens ({st.dtype})")
    return 0
