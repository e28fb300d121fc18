"""Batch -> loss, by architecture, and the one optimizer step every command trains with.

``make_loss_fn`` is the one place the trainer and the evaluator turn sampled rows into model
calls, so the loop stays the same for decoder-only and encoder-decoder models. ``train_step``
is the step of ``train``, ``finetune`` and the profiler alike; what each adds to it (timing,
meters, metrics, injected faults) comes in as hooks.
"""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch
import torch.distributed as dist

from megallama.train.hooks import NO_HOOKS, Hooks

LossFn = Callable[[torch.nn.Module, torch.Tensor], Tuple[torch.Tensor, object]]


def decoder_loss(model, rows: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Next-token loss of ``seq_len + 1``-token rows, and the number of tokens it averages."""
    return model(rows[:, :-1], labels=rows[:, 1:]), rows[:, 1:].numel()


def make_loss_fn(arch: str, seq_len: int) -> LossFn:
    """``fn(model, rows) -> (mean loss, tokens counted)``; ``seq_len`` is the encoder length. The
    count may be a tensor (no device sync until the evaluator reads it)."""
    if arch != "encoder_decoder":
        return decoder_loss
    from megallama.data.seq2seq import split_batch

    def seq2seq_loss(model, rows: torch.Tensor) -> Tuple[torch.Tensor, int]:
        b = split_batch(rows, seq_len)
        return model(b.src, b.tgt, labels=b.labels, src_mask=b.src_mask), (b.labels != -100).sum()

    return seq2seq_loss


def _inputs_and_labels(batches: Iterator[torch.Tensor]):
    """Decoder rows as the pipeline engine takes them (pipelines are decoder-only)."""
    for rows in batches:
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def train_step(rt, batches: Iterator, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
    """One optimizer step of ``rt.engine`` over ``rt.accum`` micro-batches from ``batches`` (on
    the device; a pipeline's first and last stages take them inside DeepSpeed's schedule).
    Returns this rank's loss: the mean over its micro-batches, or the pipeline's (already
    averaged over DP) on every stage."""
    rt.step += 1
    hooks.step_begin(rt)
    engine = rt.engine
    if rt.pipeline:
        with hooks.pipeline(engine), hooks.phase("step"):
            loss = engine.train_batch(data_iter=_inputs_and_labels(batches))
    else:
        losses = []
        with hooks.phase("step"):
            for i in range(rt.accum):
                # the boundary said outright: DeepSpeed's own count (micro-steps modulo accumulation
                # steps) goes astray once train.rampup_batch_size changes the accumulation steps
                engine.set_gradient_accumulation_boundary(i == rt.accum - 1)
                batch = next(batches)
                with hooks.phase("forward"):
                    loss, _ = rt.loss_fn(engine, batch)
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
    """A step's loss as every rank reports it: the mean over data-parallel ranks (the pipeline
    engine has already taken it)."""
    if rt.pipeline or rt.state.dp == 1:
        return loss.item()
    loss = loss.detach().float().clone()
    dist.all_reduce(loss, group=rt.state.dp_group)
    return (loss / rt.state.dp).item()
