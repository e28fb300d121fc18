"""Batch -> loss, by architecture: the one place the trainer and the evaluator turn sampled
rows into model calls, so the loop stays the same for decoder-only and encoder-decoder models."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

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
