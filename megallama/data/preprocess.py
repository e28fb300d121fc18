"""Tokenize records into a ``.bin``/``.idx`` pair: one document per record, ``</s>`` appended.

Worker processes parse and encode batches of raw records; the parent reads the inputs, keeps a
bounded number of batches in flight (so memory stays flat on any input size) and writes results
in input order, so the output is identical for any number of workers. Workers are spawned, not
forked: this may run inside a trainer that already holds threads and process groups.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from megallama.data.indexed import IndexedWriter, dtype_for_vocab
from megallama.data.records import Drop, InputSpec, RawRecord, batches, parse, total_bytes
from megallama.data.sources import display
from megallama.errors import UserError


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    skipped: int
    seconds: float
    dtype: str
    filtered: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def docs_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)


class _Encoder:
    """Per-process state: the tokenizer (pickled as its file's bytes) and the input spec."""

    def __init__(self, tokenizer, spec: InputSpec, dtype: str, bos: bool):
        self.tok, self.spec, self.dtype, self.bos = tokenizer, spec, np.dtype(dtype), bos
        self.eod = tokenizer.eod_id

    def __call__(self, batch: List[RawRecord]):
        """(flat tokens, lengths, skipped, filtered) or, for a bad record, ``("error", message)``."""
        try:
            texts = [parse(self.spec, i, line, raw) for i, line, raw in batch]
        except UserError as exc:
            return "error", str(exc)
        kept = [t for t in texts if isinstance(t, str)]
        ids = self.tok.encode_batch(kept)  # one core per worker, as asked
        head = [self.tok.bos_id] if self.bos else []
        docs = [head + d + [self.eod] for d in ids]
        lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), self.dtype, int(lengths.sum()))
        return flat, lengths, texts.count(Drop.EMPTY), texts.count(Drop.FILTERED)


_WORKER: Optional[_Encoder] = None


def _init_worker(tokenizer, spec: InputSpec, dtype: str, bos: bool) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one message, cleanup
    _WORKER = _Encoder(tokenizer, spec, dtype, bos)


def _work(batch: List[RawRecord]):
    return _WORKER(batch)


def _progress(total: Optional[int], enabled: Optional[bool]):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                disable=(None if enabled is None else not enabled), file=sys.stderr, dynamic_ncols=True)


def preprocess(spec: InputSpec, tokenizer, output_prefix: str, *, workers: int = 1, bos: bool = False,
               overwrite: bool = False, progress: Optional[bool] = None) -> PreprocessStats:
    """Tokenize ``spec``'s inputs with ``tokenizer`` (a :class:`Tokenizer`) into ``output_prefix``.

    ``progress``: True/False forces the bar on/off; None shows it when stderr is a terminal.
    """
    spec.check()
    tokenizer.encode("", bos=bos, eos=True)  # fails early, naming the model, when it has no EOS (or BOS, asked)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    start = time.perf_counter()
    docs = tokens = skipped = filtered = 0
    pool = None
    bar = _progress(total_bytes(spec), progress)  # first: a signal while tqdm imports leaves nothing
    try:
        writer = IndexedWriter(output_prefix, dtype, overwrite=overwrite)
    except BaseException:
        bar.close()
        raise
    try:  # from here on any exit, a signal's included, removes the temporary files
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker,
                                       (tokenizer, spec, dtype.name, bos))
            results = _ordered(pool, batches(spec), 2 * workers)
        else:
            encoder = _Encoder(tokenizer, spec, dtype.name, bos)
            results = ((encoder(b), used) for b, used in batches(spec))
        for result, used in results:
            if isinstance(result[0], str):  # ("error", message) from a worker
                raise UserError(result[1])
            flat, lengths, n_skipped, n_filtered = result
            writer.add_documents(flat, lengths)
            docs += len(lengths)
            tokens += int(lengths.sum())
            skipped += n_skipped
            filtered += n_filtered
            bar.update(used)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s {tokens / elapsed:,.0f} tok/s", refresh=False)
        if docs == 0:
            dropped = ", ".join(f"{n} {what}" for n, what in ((skipped, "empty ones skipped"),
                                                              (filtered, "filtered out")) if n)
            raise UserError(f"{display(spec.paths[0])}: no documents found in the input"
                            + (f" ({dropped})" if dropped else ""))
    except BaseException:
        writer.abort()
        if pool is not None:
            _kill_workers(pool)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # running batches are small: a short wait
    writer.finalize()
    return PreprocessStats(docs, tokens, skipped, time.perf_counter() - start, dtype.name, filtered)


def _kill_workers(pool) -> None:
    """After a failure nothing more is wanted from the workers: kill them outright. Otherwise,
    once one worker has died, CPython 3.11's executor can block forever in ``shutdown`` (a
    survivor stuck sending its result while the manager thread joins the feeder thread)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.kill()


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM while ``submit`` may be spawning a worker: a signal there cuts the
    parent's pipe to the half-started child, which then prints a traceback of its own. A signal
    that came meanwhile is raised again afterwards, to the handler that was in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    saved = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if caught:
            signal.raise_signal(caught[0])


def _ordered(pool, source, depth: int):
    """Results of ``_work`` over ``source`` in order, at most ``depth`` batches in flight.

    A worker killed from outside (out of memory) fails the run instead of hanging it, which is
    why this uses concurrent.futures rather than multiprocessing.Pool.
    """
    pending: deque = deque()
    try:  # the pool can break while a result is awaited or, as soon as a worker dies, at submit
        for batch, used in source:
            with _signals_held():
                fut = pool.submit(_work, batch)
            pending.append((fut, used))
            if len(pending) >= depth:
                fut, n = pending.popleft()
                yield fut.result(), n
        while pending:
            fut, n = pending.popleft()
            yield fut.result(), n
    except Exception as exc:  # a broken pool can also fail to spawn a worker it was starting (fds closed)
        if isinstance(exc, BrokenProcessPool) or getattr(pool, "_broken", False):
            raise UserError("a preprocessing worker died (killed, or out of memory?); nothing was written; "
                            "retry with fewer --workers") from None
        raise
