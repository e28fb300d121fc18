"""Batch -> loss, by architecture, and the one optimizer step every command trains with.

``make_loss_fn`` is the one place the trainer and the evaluator turn sampled rows into model
calls, so the loop stays the same for decoder-only and encoder-decoder models. ``train_step``
is the step of ``train``, ``finetune`` and the profiler alike; what each adds to it (timing,
meters, metrics, injected faults) comes in as hooks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.train.hooks import NO_HOOKS, Hooks

LossFn = Callable[[torch.nn.Module, torch.Tensor], Tuple[torch.Tensor, object]]
IGNORE = -100  # labels the loss skips


@dataclass(frozen=True)
class DecoderLoss:
    """Decoder rows -> model call. Rows are ``[b, seq_len + 1]`` tokens, or ``[b, 2, seq_len + 1]``
    tokens over document ids when the data delivers documents (``data.document_mask``): then
    attention stays inside each document, a document's last token predicts nothing (its label
    would be the next document's first token) and, with ``reset_positions``, RoPE restarts."""

    document_mask: bool = False
    reset_positions: bool = False

    @property
    def counts_vary(self) -> bool:
        """Whether micro-batches may count different labels (plain rows ignore none)."""
        return self.document_mask

    def parts(self, rows: torch.Tensor):
        """``(tokens, labels, document ids or None, positions or None)``."""
        if rows.dim() == 2:
            return rows[:, :-1], rows[:, 1:], None, None
        if not self.document_mask:  # the weighting trusts counts_vary
            raise ValueError("rows with document ids need DecoderLoss(document_mask=True)")
        tokens, docs = rows[:, 0], rows[:, 1]
        labels = tokens[:, 1:].masked_fill(docs[:, 1:] != docs[:, :-1], IGNORE)
        docs = docs[:, :-1]
        positions = None
        if self.reset_positions:
            from megallama.model.rope import document_positions

            positions = document_positions(docs)
        return tokens[:, :-1], labels, docs, positions

    def count(self, rows: torch.Tensor) -> torch.Tensor:
        """Labels the loss averages (a device tensor: no sync)."""
        return (self.parts(rows)[1] != IGNORE).sum()

    def __call__(self, model, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens, labels, docs, positions = self.parts(rows)
        if docs is None:
            return model(tokens, labels=labels), (labels != IGNORE).sum()
        return model(tokens, labels=labels, document_ids=docs, position_ids=positions), (labels != IGNORE).sum()

    def pipeline_inputs(self, rows: torch.Tensor):
        """``(inputs, labels)`` as the pipeline engine takes them: inputs are the tokens, or
        ``(tokens, document ids[, positions])``, which the stages pass along with the activations."""
        tokens, labels, docs, positions = self.parts(rows)
        if docs is None:
            return tokens.contiguous(), labels.contiguous()
        extra = (docs,) if positions is None else (docs, positions)
        return tuple(t.contiguous() for t in (tokens, *extra)), labels.contiguous()


@dataclass(frozen=True)
class Seq2SeqLoss:
    seq_len: int  # the encoder length
    counts_vary = True  # targets are padded with ignored labels

    def _batch(self, rows: torch.Tensor):
        from megallama.data.seq2seq import split_batch

        return split_batch(rows, self.seq_len)

    def count(self, rows: torch.Tensor) -> torch.Tensor:
        return (self._batch(rows).labels != IGNORE).sum()

    def __call__(self, model, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self._batch(rows)
        return model(b.src, b.tgt, labels=b.labels, src_mask=b.src_mask), (b.labels != IGNORE).sum()


def make_loss_fn(arch: str, seq_len: int, document_mask: bool = False, reset_positions: bool = False) -> LossFn:
    """``fn(model, rows) -> (mean loss, tokens counted)``; ``seq_len`` is the encoder length. The
    count is a tensor (no device sync until the evaluator reads it); ``fn.count(rows)`` gives it
    without a forward pass, which the step needs to weight its micro-batches."""
    if arch == "encoder_decoder":
        return Seq2SeqLoss(seq_len)
    return DecoderLoss(document_mask, reset_positions)


def token_weighting(loss_fn: LossFn, state, rows: List[torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(counts, scale)``: each micro-batch's valid labels, and ``dp x accum / N`` with N those of
    the whole global batch (summed here and over DP). DeepSpeed divides each backward by ``accum``
    and averages gradients over DP, so a micro-batch's mean loss times ``count x scale`` makes the
    step's gradient, and the DP mean of the loss it reports, those of the global batch's token
    mean: a micro-batch of mostly ignored labels no longer weighs as much as a full one. None
    (equal weights, no collective) where every micro-batch counts the same: plain packed rows, or
    one label per example (classification)."""
    if not getattr(loss_fn, "counts_vary", False):
        return None
    counts = torch.stack([loss_fn.count(r) for r in rows]).float()
    total = counts.sum()
    if state.dp > 1:
        dist.all_reduce(total, group=state.dp_group)
    return counts, (state.dp * len(rows)) / total.clamp(min=1)


def train_step(rt, batches: Iterator, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
    """One optimizer step of ``rt.engine`` over ``rt.accum`` micro-batches from ``batches`` (on
    the device; every pipeline stage draws them, so ranks agree on the data position, and
    DeepSpeed's schedule feeds them to the first and last), its loss the token mean of the whole
    global batch (:func:`token_weighting`). Returns this rank's
    loss, whose mean over DP is the global batch's (the pipeline's is already that mean, on
    every stage)."""
    rt.step += 1
    hooks.step_begin(rt)
    engine = rt.engine
    if rt.pipeline:
        loss_fn = rt.module.loss_fn  # the last stage's: weights each micro-batch by its count x scale
        with hooks.pipeline(engine), hooks.phase("step"):
            rows = [next(batches) for _ in range(rt.accum)]
            weighting = token_weighting(rt.loss_fn, rt.state, rows) if engine.is_last_stage() else None
            loss_fn.scale = weighting[1] if weighting else None
            try:
                loss = engine.train_batch(data_iter=map(rt.loss_fn.pipeline_inputs, rows))
            finally:
                loss_fn.scale = None  # evaluation takes plain micro-batch means
    else:
        losses = []
        with hooks.phase("step"):
            rows = [next(batches) for _ in range(rt.accum)]  # every count is needed before the first backward
            weighting = token_weighting(rt.loss_fn, rt.state, rows)
            for m, batch in enumerate(rows):
                # the boundary said outright: DeepSpeed's own count (micro-steps modulo accumulation
                # steps) goes astray once train.rampup_batch_size changes the accumulation steps
                engine.set_gradient_accumulation_boundary(m == rt.accum - 1)
                with hooks.phase("forward"):
                    loss, _ = rt.loss_fn(engine, batch)
                    if weighting is not None:
                        loss = loss * (weighting[0][m] * weighting[1])
                loss = hooks.loss(rt.step, loss)
                with hooks.phase("backward"):
                    engine.backward(loss)
                with hooks.phase("optimizer"):
                    engine.step()
                losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
    hooks.step_end(rt, loss)
    return loss


def step_loss(rt, loss: torch.Tensor) -> float:
    """A step's loss as every rank reports it: the mean over data-parallel ranks, which is the
    global batch's token mean (the pipeline engine has already taken it)."""
    if rt.pipeline or rt.state.dp == 1:
        return loss.item()
    loss = loss.detach().float().clone()
    dist.all_reduce(loss, group=rt.state.dp_group)
    return (loss / rt.state.dp).item()
